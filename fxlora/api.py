"""fxlora's public entry points: :func:`rewrite` and :func:`fold`.

They capture or copy what must not be shared, run the passes in ``fxlora.passes``, and return a new
module; the model passed in is never modified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from . import passes
from .capture import copy_graph_module, export_capture, trace
from .errors import FoldError, FxLoraError, RuleError, TraceError
from .lora import graph_sites
from .module import LoraGraphModule
from .plan import Plan, make_plan
from .rules import Rule, as_rules
from .state import BIAS_MODES, mark_only_lora_as_trainable

__all__ = ["rewrite", "fold", "plan", "capture"]

logger = logging.getLogger("fxlora")


CAPTURE_METHODS = ("auto", "symbolic", "export")


@dataclass(frozen=True)
class CaptureOptions:
    """How to capture a model: the keyword arguments :func:`capture`, :func:`rewrite`, :func:`plan` and
    :func:`fxlora.report` share."""

    example_inputs: Sequence[Any] | None = None
    example_kwargs: dict[str, Any] | None = None
    capture: str = "auto"
    concrete_args: dict[str, Any] | None = None
    leaf_modules: Sequence[type | str] = ()
    dynamic_shapes: Any = "auto"

    @property
    def has_examples(self) -> bool:
        return bool(self.example_inputs) or bool(self.example_kwargs)


def _capture(model: nn.Module, opts: CaptureOptions) -> tuple[LoraGraphModule, nn.Module]:
    """The captured graph module, and the full module tree it was captured from (for names and types)."""
    if opts.capture not in CAPTURE_METHODS:
        raise TraceError(f"capture must be one of {', '.join(map(repr, CAPTURE_METHODS))}, got {opts.capture!r}.")
    if isinstance(model, GraphModule):
        root, graph = trace(model)
        gm = LoraGraphModule(root, graph, type(model).__name__)
        gm.meta["fxlora_capture"] = model.meta.get("fxlora_capture", "graph_module")
        return gm, root
    if opts.capture in ("auto", "symbolic"):
        try:
            root, graph = trace(model, concrete_args=opts.concrete_args, leaf_modules=opts.leaf_modules)
            gm = LoraGraphModule(root, graph, type(model).__name__)
            gm.meta["fxlora_capture"] = "symbolic_trace"
            return gm, root
        except TraceError as e:
            if opts.capture == "symbolic":
                raise
            if not opts.has_examples:
                raise TraceError(
                    f"{e} Or pass example_inputs=(...) (and example_kwargs) so that fxlora can capture "
                    "the model with torch.export instead."
                ) from e.__cause__
            logger.info("symbolic tracing failed (%s); capturing with torch.export", str(e).split(". ")[0])
    root, exported = export_capture(
        model, tuple(opts.example_inputs or ()), dict(opts.example_kwargs or {}), dynamic_shapes=opts.dynamic_shapes
    )
    gm = LoraGraphModule(exported, exported.graph, type(model).__name__)
    gm.meta["fxlora_capture"] = "torch.export"
    gm.train(model.training)  # captured in training mode; hand it back in the caller's mode
    return gm, root


def _capture_and_plan(
    model: nn.Module, rules: list[Rule], opts: CaptureOptions
) -> tuple[LoraGraphModule, nn.Module, Plan]:
    """Capture and resolve the rules (raising before any change).  With ``capture="auto"`` and example
    inputs, a symbolic graph in which the rules cannot select their sites (they sit inside a module the
    symbolic tracer keeps opaque, such as ``nn.MultiheadAttention``) is captured again with torch.export."""
    gm, root = _capture(model, opts)
    try:
        return gm, root, make_plan(gm, rules, root)
    except RuleError:
        if not (opts.capture == "auto" and gm.meta.get("fxlora_capture") == "symbolic_trace" and opts.has_examples):
            raise
    logger.info("the rules do not resolve on the symbolic graph; capturing with torch.export")
    gm, root = _capture(model, replace(opts, capture="export"))
    return gm, root, make_plan(gm, rules, root)


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    capture: str = "auto",
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] = (),
    dynamic_shapes: Any = "auto",
) -> LoraGraphModule:
    """Capture ``model`` as a graph module without modifying it.

    ``capture="symbolic"`` uses ``torch.fx.symbolic_trace`` (with ``concrete_args`` and ``leaf_modules``,
    module types or qualified names to keep opaque); ``"export"`` uses ``torch.export`` (non-strict, on
    ``example_inputs`` / ``example_kwargs``; every input dimension dynamic unless ``dynamic_shapes`` says
    otherwise); ``"auto"`` tries symbolic tracing first and falls back to ``torch.export`` when example
    inputs are given.  ``gm.meta["fxlora_capture"]`` says which was used (``"symbolic_trace"`` or
    ``"torch.export"``).  The result can be passed to :func:`rewrite`.
    """
    opts = CaptureOptions(example_inputs, example_kwargs, capture, concrete_args, leaf_modules, dynamic_shapes)
    return _capture(model, opts)[0]


def plan(
    model: nn.Module,
    rules: Rule | Sequence[Rule],
    *,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    capture: str = "auto",
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] = (),
    dynamic_shapes: Any = "auto",
) -> Plan:
    """Resolve ``rules`` against ``model`` without rewriting anything: which site gets which rule."""
    opts = CaptureOptions(example_inputs, example_kwargs, capture, concrete_args, leaf_modules, dynamic_shapes)
    return _capture_and_plan(model, as_rules(rules), opts)[2]


def rewrite(
    model: nn.Module,
    rules: Rule | Sequence[Rule],
    *,
    bias: str = "none",
    merge_on_eval: bool = False,
    fuse_siblings: bool = False,
    example_inputs: Sequence[Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    capture: str = "auto",
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] = (),
    dynamic_shapes: Any = "auto",
) -> LoraGraphModule:
    """Add a LoRA side branch ``B(A(dropout(x))) * alpha / r`` at every site the rules select.

    Args:
        model: any ``nn.Module`` (captured as :func:`capture` says), or a ``GraphModule``.
        rules: one :class:`fxlora.Rule` or a list; see :mod:`fxlora.rules` for matching and precedence.
        bias: which biases train besides the LoRA parameters: ``"none"``, ``"all"`` or ``"lora_only"``
            (the biases of adapted sites), as loralib's ``mark_only_lora_as_trainable``.
        merge_on_eval: run the folded model in eval mode (see :class:`fxlora.LoraGraphModule`; costs a
            copy of each adapted weight while in eval mode).
        fuse_siblings: run :func:`fxlora.passes.fuse_siblings`: linear branches that read the same input
            (q, k and v projections) share one A-matmul.  Same parameters and state dict; a branch with
            dropout or ``enable_lora`` keeps its own.
        example_inputs, example_kwargs, capture, concrete_args, leaf_modules, dynamic_shapes: how to
            capture the model: see :func:`capture`.  Hugging Face transformers models need
            ``torch.export``: pass example inputs (and ``example_kwargs={"use_cache": False}`` for
            decoders).  Dropout, attention dropout and batch norm captured by ``torch.export`` follow
            ``.train()`` / ``.eval()`` of the result.

    Returns:
        A new :class:`LoraGraphModule`.  It shares the base weights' storage with ``model`` (nothing is
        copied but buffers and trainable biases) and leaves ``model`` unchanged.  Each site's nodes carry
        ``node.meta["fxlora"]`` with the site, its role and its :class:`fxlora.lora.SiteSpec`, which
        records the rule that selected it.
    """
    rules = as_rules(rules)
    if bias not in BIAS_MODES:
        raise FxLoraError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {bias!r}.")
    opts = CaptureOptions(example_inputs, example_kwargs, capture, concrete_args, leaf_modules, dynamic_shapes)
    gm, _, the_plan = _capture_and_plan(model, rules, opts)
    passes.rewrite(gm, the_plan)
    if fuse_siblings:
        passes.fuse_siblings(gm)
    gm.__dict__["merge_on_eval"] = bool(merge_on_eval)
    mark_only_lora_as_trainable(gm, bias)
    return gm


def fold(gm: GraphModule, *, dtype: torch.dtype | None = None) -> GraphModule:
    """A new plain ``GraphModule`` with every LoRA update folded into its weight.

    Each merged weight is ``W + delta * scale`` computed in float32 (float64 for float64 weights) and rounded once, to ``dtype`` when
    given (the other floating-point parameters and buffers are cast to it too) or to the base weight's
    dtype.  The result has the base model's graph and state-dict keys; tensors that were not adapted
    are shared with ``gm``, and ``gm`` itself is not modified.
    """
    if not isinstance(gm, GraphModule) or not graph_sites(gm):
        raise FoldError(
            f"fold expects the graph module returned by fxlora.rewrite; this {type(gm).__name__} has no LoRA sites."
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise FoldError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    out = copy_graph_module(gm)
    passes.fold(out, dtype=dtype)
    if dtype is not None:
        out.to(dtype)
    return out
