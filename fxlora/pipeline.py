"""fxlora's pipeline: capture -> plan -> rewrite, one path for every entry point.

:func:`capture`, :func:`plan` and :func:`rewrite` (and :func:`fxlora.report`, which calls :func:`plan`)
take the model positionally and every option by keyword; the capture options are one
:class:`~fxlora.options.CaptureOptions` (``capture=``, or its fields as keywords), resolved by
:func:`~fxlora.options.capture_options` and run by the one internal function :func:`_capture`.  The
model passed in is never modified: capture works on a shadow copy (new module objects over the same
parameter storage).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from torch import nn
from torch.fx import GraphModule

from .errors import ArgumentError, RuleError, TraceError
from .graph_module import LoraGraphModule
from .lora import DEFAULT_ADAPTER
from .options import CaptureOptions, capture_options, no_positional
from .passes import FuseSiblings, RewritePass, SplitUnits
from .provenance import adapter_state, adapters_of
from .resolution import (
    MODULE_TYPES_META,
    Plan,
    check_adapter_name,
    make_plan,
    resolve_units,
    warn_unreached,
)
from .rules import Rule, as_rules
from .state import BIAS_MODES, mark_only_lora_as_trainable
from .ties import check_tied_mode
from .folding import BASE_CODE, CAPTURED_CODE
from .tracing import (
    GeneratedCode,
    build_graph_module,
    copy_graph_module,
    ensure_code,
    export_capture,
    gc_paused,
    generated_code,
    keep_state_keys,
    trace,
    trace_graph_module,
)

__all__ = ["capture", "plan", "rewrite"]

logger = logging.getLogger("fxlora")

CAPTURE_META = "fxlora_capture"  # gm.meta key: "symbolic_trace", "torch.export" or "graph_module"


def _capture(model: nn.Module, opts: CaptureOptions) -> tuple[LoraGraphModule, nn.Module]:
    """The captured graph module, and the full module tree it was captured from (for names and types;
    the types are also recorded in ``gm.meta["fxlora_module_types"]`` for later plans on the graph)."""
    gm, root = _capture_graph(model, opts)
    types = getattr(model, "meta", {}).get(MODULE_TYPES_META) if isinstance(model, GraphModule) else None
    gm.meta[MODULE_TYPES_META] = dict(types) if types else {n: type(m) for n, m in root.named_modules() if n}
    keep_state_keys(gm, model)  # the model's state-dict keys, so that a folded module loads into it
    return gm, root


def _capture_graph(model: nn.Module, opts: CaptureOptions) -> tuple[LoraGraphModule, nn.Module]:
    # built without code: a rewrite recompiles it right away, and capture() and plan() generate it (ensure_code)
    if isinstance(model, GraphModule):
        base = _base_code_of(model)
        root, graph, normalized = trace_graph_module(model)
        gm = build_graph_module(LoraGraphModule, root, graph, type(model).__name__, code=False)
        gm.meta[CAPTURE_META] = model.meta.get(CAPTURE_META, "graph_module")
        if base is not None and not normalized:  # the graph is model's, node for node: so is its code
            gm.__dict__[CAPTURED_CODE] = base
        return gm, root
    if opts.method in ("auto", "symbolic"):
        try:
            root, graph = trace(model, concrete_args=opts.concrete_args, leaf_modules=opts.leaf_modules)
            gm = build_graph_module(LoraGraphModule, root, graph, type(model).__name__, code=False)
            gm.meta[CAPTURE_META] = "symbolic_trace"
            return gm, root
        except TraceError as e:
            if opts.method == "symbolic":
                raise
            if not opts.has_examples:
                raise TraceError(
                    f"{e} Or pass example_inputs=(...) (and example_kwargs) so that fxlora can capture "
                    "the model with torch.export instead."
                ) from e.__cause__
            logger.info("symbolic tracing failed (%s); capturing with torch.export", str(e).split(". ")[0])
    root, exported = export_capture(
        model, tuple(opts.example_inputs or ()), dict(opts.example_kwargs or {}), dynamic_shapes=opts.dynamic_shapes,
        causal_attention=opts.causal_attention,
    )
    gm = build_graph_module(LoraGraphModule, exported, exported.graph, type(model).__name__, code=False)
    gm.meta[CAPTURE_META] = "torch.export"
    gm.train(model.training)  # captured in training mode; hand it back in the caller's mode
    return gm, root


def _base_code_of(model: GraphModule) -> GeneratedCode | None:
    """The code fxlora generated for ``model``'s graph, when it is still current and the graph is a base graph
    (no adapter in it): a rewrite of that graph folds back to it, so the fold reuses the code."""
    return generated_code(model) if not adapters_of(model) else None


def _plan(
    model: nn.Module, rules: list[Rule], opts: CaptureOptions, adapter: str, train_modules: Any = None, tied: str = "adapt"
) -> Plan:
    """Capture and resolve the rules (raising before any change).  With ``method="auto"`` and example
    inputs, a symbolic graph in which the rules cannot select their sites (they sit inside a module the
    symbolic tracer keeps opaque, such as ``nn.MultiheadAttention``) is captured again with torch.export."""
    gm, root = _capture(model, opts)
    fallback = opts.method == "auto" and gm.meta.get(CAPTURE_META) == "symbolic_trace" and opts.has_examples
    try:
        the_plan = make_plan(gm, rules, root, adapter=adapter, tied=tied, train_modules=train_modules or ())
        if not (fallback and the_plan.opaque):  # a type rule misses modules inside opaque leaves: export sees them
            warn_unreached(the_plan)
            return the_plan
    except RuleError:
        if not fallback:
            raise
    logger.info("the rules do not resolve on the symbolic graph; capturing with torch.export")
    gm, root = _capture(model, dataclasses.replace(opts, method="export"))
    the_plan = make_plan(gm, rules, root, adapter=adapter, tied=tied, train_modules=train_modules or ())
    warn_unreached(the_plan)
    return the_plan


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TraceError(f"{where} expects an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}.")


@gc_paused()
def capture(model: nn.Module, *positional: Any, capture: CaptureOptions | str | None = None, **capture_kwargs: Any) -> LoraGraphModule:
    """Capture ``model`` as a graph module without modifying it.

    ``capture`` is a :class:`CaptureOptions` or its ``method`` (``"auto"``, ``"symbolic"``, ``"export"``);
    the other keywords are fields of :class:`CaptureOptions` (``example_inputs``, ``example_kwargs``,
    ``concrete_args``, ``leaf_modules``, ``dynamic_shapes``) and override it.
    ``gm.meta["fxlora_capture"]`` says which capture was used (``"symbolic_trace"`` or
    ``"torch.export"``).  The result can be passed to :func:`rewrite`.
    """
    no_positional(positional, "capture")
    _check_model(model, "fxlora.capture")
    gm = _capture(model, capture_options(capture, capture_kwargs, "capture"))[0]
    gm.__dict__.pop(CAPTURED_CODE, None)  # the capture gets code of its own, which a rewrite of it reuses
    return ensure_code(gm)


@gc_paused()
def plan(
    model: nn.Module,
    rules: Rule | Sequence[Rule] | None = None,
    *positional: Any,
    adapter: str = DEFAULT_ADAPTER,
    train_modules: Sequence[str | type] | None = None,
    tied: str = "adapt",
    capture: CaptureOptions | str | None = None,
    **capture_kwargs: Any,
) -> Plan:
    """Resolve ``rules`` against ``model`` without rewriting anything: which site gets which rule.

    Returns a :class:`~fxlora.resolution.Plan` bound to the graph module it captured; pass it to
    :func:`rewrite` (``fxlora.rewrite(plan)``) to apply it, or to :func:`fxlora.report` to print it.
    Without rules, the plan selects nothing and lists every candidate site.  ``tied`` as for
    :func:`rewrite`; capture options as for :func:`capture`.
    """
    no_positional(positional, "plan")
    _check_model(model, "fxlora.plan")
    opts = capture_options(capture, capture_kwargs, "plan")
    the_plan = _plan(
        model, [] if rules is None else as_rules(rules), opts, check_adapter_name(adapter), train_modules, check_tied_mode(tied)
    )
    the_plan.graph_module.__dict__.pop(CAPTURED_CODE, None)  # the plan's module has code of its own
    ensure_code(the_plan.graph_module)
    return the_plan


@gc_paused()
def rewrite(
    model: nn.Module | Plan,
    rules: Rule | Sequence[Rule] | None = None,
    *positional: Any,
    adapter: str = DEFAULT_ADAPTER,
    train_modules: Sequence[str | type] | None = None,
    units: Sequence[str | type] | str | type | None = None,
    bias: str = "none",
    merge_on_eval: bool = False,
    fuse_siblings: bool = False,
    tied: str = "adapt",
    capture: CaptureOptions | str | None = None,
    **capture_kwargs: Any,
) -> LoraGraphModule:
    """Add a LoRA side branch ``B(A(dropout(x))) * alpha / r`` at every site the rules select.

    Args:
        model: any ``nn.Module`` (captured as :func:`capture` says), a ``GraphModule``, or a
            :class:`~fxlora.resolution.Plan` from :func:`plan` (then give no rules and no capture options).
        rules: one :class:`fxlora.Rule` or a list; see :mod:`fxlora.rules` for matching and precedence.
        adapter: the adapter's name; its parameters are ``<site>.lora_A`` / ``<site>.lora_B`` for the
            default adapter (loralib's keys) and ``<site>.lora_A_<adapter>`` otherwise.
        train_modules: modules trained in full beside the LoRA factors (PEFT's ``modules_to_save``: a
            classifier head, a new embedding), written like rule targets; the adapter gets its own copy of
            each (``<module>_<adapter>``), saved, loaded, switched and folded with it.
        units: module paths or types written like rule targets (``"model.layers.*"``, a block class):
            each becomes a graph module of its own whose forward runs, so that FSDP2's ``fully_shard`` per
            block and activation checkpointing work (``fxlora.passes.split_units``; names, state dicts and
            fold are unchanged).  Choose the adapters before: a module split into units is trained, saved
            and folded, not switched.
        bias: which biases train besides the LoRA parameters: ``"none"``, ``"all"`` or ``"lora_only"``
            (the biases of adapted sites), as loralib's ``mark_only_lora_as_trainable``.
        merge_on_eval: run the folded model in eval mode (see :class:`fxlora.LoraGraphModule`; costs a
            copy of each adapted weight while in eval mode).
        fuse_siblings: run ``fxlora.passes.fuse_siblings``: linear branches that read the same input
            (q, k and v projections) share one shrink matmul in a train step (a forward that records no
            gradient, lowered, still merges each site per call).  Same parameters and state dict.
        tied: what a rule that selects a use of a tied weight (GPT-2's token embedding and LM head) does:
            ``"adapt"`` (default) gives the *weight* one LoRA pair applied at every use and folded once,
            so the folded weights stay tied; ``"refuse"`` raises :class:`RuleError` naming both uses.
        capture, **capture_kwargs: how to capture the model: see :func:`capture`.  Hugging Face
            transformers models need ``torch.export``: pass example inputs (and
            ``example_kwargs={"use_cache": False}`` for decoders).  Dropout, attention dropout and batch
            norm captured by ``torch.export`` follow ``.train()`` / ``.eval()`` of the result.

    Returns:
        A new :class:`LoraGraphModule`.  It shares the base weights' storage with ``model`` (nothing is
        copied but buffers and trainable biases) and leaves ``model`` unchanged.  Each site's nodes carry
        ``node.meta["fxlora"]`` with the site, its role and its :class:`fxlora.SiteSpec`, which records
        the rule that selected it.
    """
    no_positional(positional, "rewrite")
    if bias not in BIAS_MODES:
        raise ArgumentError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {bias!r}.")
    if isinstance(model, Plan):
        if (
            rules is not None or capture is not None or capture_kwargs or adapter != DEFAULT_ADAPTER or train_modules
            or tied != "adapt"
        ):
            raise ArgumentError(
                "rewrite(plan) applies the plan as it is: give no rules, adapter, train_modules, tied or capture options (make a new "
                "plan with fxlora.plan(model, rules, ...) instead)."
            )
        the_plan = model
        base = _base_code_of(the_plan.graph_module)
        gm = copy_graph_module(the_plan.graph_module, LoraGraphModule, code=False)
    else:
        _check_model(model, "fxlora.rewrite")
        if rules is None:
            raise RuleError("rewrite needs rules: fxlora.rewrite(model, [fxlora.Rule('*.q', r=8, alpha=16)]).")
        opts = capture_options(capture, capture_kwargs, "rewrite")
        the_plan = _plan(model, as_rules(rules), opts, check_adapter_name(adapter), train_modules, check_tied_mode(tied))
        gm = the_plan.graph_module
        base = gm.__dict__.pop(CAPTURED_CODE, None)
    if not the_plan.sites:
        raise RuleError("the plan selects no site: give rules that select at least one site.")
    RewritePass(the_plan)(gm)
    if fuse_siblings:
        adapter_state(gm)["fuse_siblings"] = True  # kept when adapters are switched
        FuseSiblings()(gm)
    if units is not None:
        SplitUnits(resolve_units(gm, units))(gm)
    gm.__dict__["merge_on_eval"] = bool(merge_on_eval)
    mark_only_lora_as_trainable(gm, bias)
    ensure_code(gm)  # the rewrite pass generated it
    if base is not None and units is None:
        # fold gives back the graph rewritten, node for node: its first fold reuses that graph's code
        # (units are inlined by fold, which names nodes anew)
        gm.__dict__[BASE_CODE] = (gm.__dict__["_code"], base)
    return gm
