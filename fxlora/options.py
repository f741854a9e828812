"""How a model is captured: one value, :class:`CaptureOptions`, that every entry point takes.

:func:`fxlora.capture`, :func:`fxlora.plan`, :func:`fxlora.rewrite` and :func:`fxlora.report` all take
``capture=`` (a :class:`CaptureOptions`, or the method name as a shorthand) plus the fields of
:class:`CaptureOptions` as keyword arguments, which override it; :func:`capture_options` turns what a
call received into one value.  Every capture option is keyword-only, in every function.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import nn

from .errors import ArgumentError

__all__ = ["CaptureOptions", "capture_options", "no_positional", "CAPTURE_METHODS"]

#: ``"auto"`` tries symbolic tracing, then torch.export when example inputs are given.
CAPTURE_METHODS = ("auto", "symbolic", "export")


@dataclass(frozen=True)
class CaptureOptions:
    """How to capture a model as a graph.

    Attributes:
        method: ``"symbolic"`` (``torch.fx.symbolic_trace``), ``"export"`` (``torch.export``, non-strict,
            on the example inputs) or ``"auto"`` (symbolic tracing first, then torch.export when example
            inputs are given and tracing fails or cannot see the sites the rules name).
        example_inputs: positional example inputs, for torch.export.
        example_kwargs: keyword example inputs, for torch.export (``{"use_cache": False}`` for decoders).
        concrete_args: symbolic tracing: inputs to fix to constants (``torch.fx.symbolic_trace``'s).
        leaf_modules: symbolic tracing: module types or qualified names to keep opaque.
        dynamic_shapes: torch.export: ``"auto"`` (every tensor dimension ``Dim.AUTO``), ``None`` (static
            shapes) or torch.export's own ``dynamic_shapes`` spec.
        causal_attention: torch.export: an attention whose mask the capture computed from the lengths
            alone and which is causal at every length becomes ``is_causal=True`` (and repeated key/value
            heads ``enable_gqa=True``), as the model runs eagerly (``fxlora.passes.causal_attention``).
            ``False`` keeps the captured mask.
    """

    method: str = "auto"
    example_inputs: Sequence[Any] | None = None
    example_kwargs: Mapping[str, Any] | None = None
    concrete_args: Mapping[str, Any] | None = None
    leaf_modules: Sequence[type | str] = ()
    dynamic_shapes: Any = "auto"
    causal_attention: bool = True

    def __post_init__(self) -> None:
        if self.method not in CAPTURE_METHODS:
            raise ArgumentError(
                f"the capture method must be one of {', '.join(map(repr, CAPTURE_METHODS))}, got {self.method!r}."
            )
        if self.example_inputs is not None and not isinstance(self.example_inputs, (tuple, list)):
            raise ArgumentError(
                f"example_inputs must be a tuple of positional inputs, got a {type(self.example_inputs).__name__}; "
                "for one input write example_inputs=(x,)."
            )
        if self.example_kwargs is not None and not isinstance(self.example_kwargs, Mapping):
            raise ArgumentError(f"example_kwargs must be a dict, got a {type(self.example_kwargs).__name__}.")
        if not isinstance(self.causal_attention, bool):
            raise ArgumentError(f"causal_attention must be True or False, got {self.causal_attention!r}.")
        if isinstance(self.leaf_modules, (str, type)) or not isinstance(self.leaf_modules, Sequence):
            raise ArgumentError(
                f"leaf_modules must be a list of module types or qualified names, got {self.leaf_modules!r}."
            )
        for leaf in self.leaf_modules:
            if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
                raise ArgumentError(f"leaf_modules entries must be nn.Module subclasses or qualified names, got {leaf!r}.")

    @property
    def has_examples(self) -> bool:
        return bool(self.example_inputs) or bool(self.example_kwargs)


_FIELDS = tuple(f.name for f in dataclasses.fields(CaptureOptions) if f.name != "method")


def capture_options(capture: CaptureOptions | str | None, overrides: Mapping[str, Any], where: str) -> CaptureOptions:
    """The one :class:`CaptureOptions` of a call: ``capture`` (options, a method name, or None for the
    defaults) with the keyword arguments in ``overrides`` (fields of :class:`CaptureOptions`) applied."""
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ArgumentError(
            f"{where}() got unexpected keyword arguments {', '.join(unknown)}; the capture options are "
            f"capture=, {', '.join(f'{f}=' for f in _FIELDS)}."
        )
    if capture is None:
        base = CaptureOptions()
    elif isinstance(capture, CaptureOptions):
        base = capture
    elif isinstance(capture, str):
        base = CaptureOptions(method=capture)
    else:
        raise ArgumentError(
            f"{where}(capture=...) takes a fxlora.CaptureOptions or a method name "
            f"({', '.join(map(repr, CAPTURE_METHODS))}), got {type(capture).__name__}."
        )
    return dataclasses.replace(base, **overrides) if overrides else base


def no_positional(positional: tuple[Any, ...], where: str) -> None:
    """The one refusal of extra positional arguments to the entry points (model and rules are the only
    positional ones; everything else is a keyword)."""
    if positional:
        raise ArgumentError(
            f"fxlora.{where} takes the capture options as keywords, and nothing positional but the model"
            f"{'' if where == 'capture' else ' and the rules'} (got {len(positional)} more positional "
            f"argument(s)): {where}(model{'' if where == 'capture' else ', rules'}, example_inputs=(...), "
            "example_kwargs={...})."
        )
