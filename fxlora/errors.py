"""Every exception fxlora raises on purpose.

Each is an :class:`FxLoraError` and also derives from the built-in exception a caller would otherwise
expect, so generic handlers keep working:

=====================  ==================  =====================================================
class                  also a              raised when
=====================  ==================  =====================================================
``ArgumentError``      ``ValueError``      a keyword argument has a value fxlora does not accept
``RuleError``          ``ValueError``      a rule is malformed, matches nothing, or selects a site it cannot adapt
``TraceError``         ``RuntimeError``    the model cannot be captured as a graph
``CheckpointError``    ``ValueError``      a state dict, file or adapter folder does not fit, or cannot be written
``FoldError``          ``ValueError``      an update cannot be folded (non-finite values)
``ExportError``        ``RuntimeError``    an export failed, or the artifact does not reproduce the module
``NotRewrittenError``  ``TypeError``       a function that needs a module made by :func:`fxlora.rewrite` got another
``LoraOpError``        ``ValueError``      a LoRA op (``fxlora.ops``) got tensors of mismatched shapes, dtypes or devices
``PassContractError``  ``AssertionError``  a graph pass's ``requires``/``ensures`` check failed (a pass run on a graph it was not made for)
``UsageError``         ``ValueError``      the command line got bad input (printed as one line, exit status 2)
=====================  ==================  =====================================================

Every message names the rule, node, key or file at fault and says how to fix it.  fxlora raises before
it changes anything: a failed call leaves the model, the graph module and the files as they were.
"""

from __future__ import annotations

__all__ = [
    "FxLoraError",
    "ArgumentError",
    "RuleError",
    "TraceError",
    "CheckpointError",
    "FoldError",
    "ExportError",
    "NotRewrittenError",
    "LoraOpError",
    "PassContractError",
    "UsageError",
]


class FxLoraError(Exception):
    """Base class of every error fxlora raises on purpose (never raised itself)."""


class ArgumentError(FxLoraError, ValueError):
    """A keyword argument has a value fxlora does not accept (``bias="some"``, ``capture="fast"``...)."""


class RuleError(FxLoraError, ValueError):
    """A rule is malformed, matches nothing, or selects a site it cannot adapt."""


class TraceError(FxLoraError, RuntimeError):
    """The model could not be captured as a ``torch.fx`` graph."""


class CheckpointError(FxLoraError, ValueError):
    """A LoRA state dict, file or adapter folder does not fit the model, or cannot be read or written;
    nothing was loaded or replaced."""


class FoldError(FxLoraError, ValueError):
    """An adapter cannot be folded into its base weight (non-finite values)."""


class ExportError(FxLoraError, RuntimeError):
    """An export failed, or the exported artifact does not reproduce the folded module."""


class NotRewrittenError(FxLoraError, TypeError):
    """A function that needs the graph module returned by :func:`fxlora.rewrite` got something else.

    Raised by one helper, :func:`fxlora.provenance.require_sites`, everywhere this can happen.
    """


class LoraOpError(FxLoraError, ValueError):
    """A LoRA op (:mod:`fxlora.ops`) got tensors of mismatched shapes, dtypes or devices, or a bad path
    name."""


class PassContractError(FxLoraError, AssertionError):
    """A pass's ``requires`` or ``ensures`` check failed (:mod:`fxlora.passes`): the pass was given a graph
    it was not made for (a plan of another graph, a module that already serves a mixed batch), or it left
    the graph malformed, which is a bug in the pass."""


class UsageError(FxLoraError, ValueError):
    """Bad command-line input (:mod:`fxlora.tools.cli`): printed as one line, exit status 2."""
