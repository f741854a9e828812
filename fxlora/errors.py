"""fxlora's exceptions.

Every error fxlora raises on bad input is an :class:`FxLoraError`; its message names the rule, node or
key at fault and says how to fix it.  Each subclass also derives from the built-in exception a caller
would otherwise expect (``ValueError`` for bad rules and checkpoints, ``RuntimeError`` for a model that
cannot be captured), so generic handlers keep working.  fxlora raises them before it changes anything:
a failed call leaves the model, the graph module and the checkpoint as they were.
"""

from __future__ import annotations

__all__ = ["FxLoraError", "RuleError", "TraceError", "CheckpointError", "FoldError"]


class FxLoraError(Exception):
    """Base class of every error fxlora raises on purpose."""


class RuleError(FxLoraError, ValueError):
    """A rule is malformed, matches nothing, or selects a site it cannot adapt."""


class TraceError(FxLoraError, RuntimeError):
    """The model could not be captured as a ``torch.fx`` graph."""


class CheckpointError(FxLoraError, ValueError):
    """A LoRA state dict or file does not fit the rewritten model; nothing was loaded."""


class FoldError(FxLoraError, ValueError):
    """An adapter cannot be folded into its base weight (non-finite values, not a LoRA module)."""
