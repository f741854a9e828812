"""Fold pass: constant-fold the LoRA branches into their base weights and remove them.

For each adapted weight it computes ``W + sum(coeff * delta(A, B))`` over the adapters being folded
(by default the active ones, each with coefficient 1) in float32 (float64 for float64 weights), rounds
it once to ``W``'s dtype (or to ``dtype`` when given), and installs it as a *new* parameter in place of
the base weight.  Then it erases exactly the nodes the rewrite pass added (found by their role), and
removes every adapter's LoRA parameters and dropout modules and fxlora's records.  The result is the
base model's graph, node for node.

It never writes into an existing tensor: run on a copy (as :func:`fxlora.fold` does), it leaves the
original graph module, its LoRA parameters and its base weights bit-identical.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Mapping

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from fxlora import provenance
from fxlora.distributed import full
from fxlora.errors import FoldError
from fxlora.lora import SiteSpec, merged_weight
from fxlora.sites import get_parameter
from fxlora.quantized import dense, is_quantized, requantized

from .infra import FxLoraPass, PassResult, check_contract, counters, finalize
from .train_modules import adopt_copy, drop_copies, restore_targets, trained_by

__all__ = ["FoldPass", "fold", "merged_weights", "fold_graph", "fold_modules"]


class FoldPass(FxLoraPass):
    """Fold the adapters named in ``weights`` (name -> coefficient; default: the active ones, 1 each).

    A folded adapter's fully trained modules (``train_modules``) replace the model's (the caller makes
    sure that one adapter at most trains each module, with coefficient 1)."""

    name = "fold"

    def __init__(
        self,
        dtype: torch.dtype | None = None,
        weights: Mapping[str, float] | None = None,
        requantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.dtype = dtype
        self.weights = None if weights is None else dict(weights)
        self.requantize = requantize

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        if self.weights is not None:
            known = provenance.adapters_of(gm)
            check_contract(all(name in known for name in self.weights), f"fold: unknown adapters in {self.weights}")

    def call(self, gm: GraphModule) -> PassResult:
        adapters = provenance.adapters_of(gm)
        if not adapters:
            return PassResult(gm, False)
        weights = self.weights if self.weights is not None else {a: 1.0 for a in provenance.active_adapters(gm)}

        merged = merged_weights(gm, weights, self.dtype, self.requantize)  # computed and checked before anything changes

        aliases = defaultdict(list)  # a tied weight is registered under several names: replace it at each
        for name, p in gm.named_parameters(remove_duplicate=False):
            aliases[id(p)].append(name)
        for weight, value in merged.items():
            old = gm.get_parameter(weight)
            new = nn.Parameter(value, requires_grad=old.requires_grad)
            for name in aliases[id(old)]:
                owner, _, attr = name.rpartition(".")
                setattr(gm.get_submodule(owner), attr, new)

        fold_graph(gm.graph)
        fold_modules(gm, weights, adapters)
        counters[self.name]["weights"] += len(merged)
        finalize(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        check_contract(
            not any(provenance.node_info(n) for n in gm.graph.nodes) and not provenance.adapters_of(gm),
            "fold left LoRA nodes or records in the graph",
        )


def fold_graph(graph: Graph) -> None:
    """The fold's edits of the graph: every branch's nodes erased (its ``add`` replaced by the site's own
    call), fxlora's records dropped from the nodes, and the nodes that read a module trained in full
    pointed back at the module.  What is left is the base graph, node for node."""
    for node in list(graph.nodes):
        info = provenance.node_info(node)
        if info is not None and info["role"] == provenance.ADD:
            node.replace_all_uses_with(node.args[0])
    for node in reversed(list(graph.nodes)):
        info = provenance.node_info(node)
        if info is None:
            continue
        if info["role"] == provenance.BASE:
            del node.meta[provenance.META_KEY]
        else:
            graph.erase_node(node)
    restore_targets(graph)  # fully trained modules: the graph reads the module again


def fold_modules(gm: GraphModule, weights: Mapping[str, float], adapters: Mapping[str, Mapping[str, SiteSpec]]) -> None:
    """The fold's edits of the module tree: a folded adapter's copies of the modules it trains in full become
    the modules, the other copies go, and so do every adapter's LoRA parameters and dropout modules and
    fxlora's records (``adapters``: the adapters ``gm`` had)."""
    for name in weights:
        adopt_copy(gm, name)
    for name in list(trained_by(gm)):
        drop_copies(gm, name)
    for specs in adapters.values():
        for spec in specs.values():
            for qualname in (spec.lora_A, spec.lora_B, spec.dropout_module):
                if qualname is None:
                    continue
                owner, _, attr = qualname.rpartition(".")
                delattr(gm.get_submodule(owner), attr)
    provenance.forget_sites(gm)


def merged_weights(
    gm: GraphModule,
    weights: Mapping[str, float],
    dtype: torch.dtype | None = None,
    requantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """weight name -> ``W + sum(coeff * delta)`` over the adapters in ``weights`` (name -> coefficient),
    computed by :func:`fxlora.lora.merged_weight` and checked finite (:class:`FoldError` otherwise).  A
    quantized ``W`` (:mod:`fxlora.quantized`) is dequantized first, and the merged weight quantized again
    with ``requantize`` when it is given."""
    adapters = provenance.adapters_of(gm)
    updates: dict[str, list] = defaultdict(list)  # weight name -> [(A, B, spec, coeff)]
    for name, coeff in weights.items():
        for spec in adapters[name].values():
            A, B = full(get_parameter(gm, spec.lora_A)), full(get_parameter(gm, spec.lora_B))  # gathered under FSDP2
            updates[spec.weight].append((A, B, spec, coeff))
    merged: dict[str, torch.Tensor] = {}
    # (what is checked, its site, finite?) for every merged weight, and for the factors of every term with a
    # zero coefficient (or one that is zero in float32): a NaN or Inf factor reaches the merged weight through any other coefficient, but
    # addmm_ with alpha 0 never reads its factors, and a zero coefficient does not make a diverged factor
    # foldable.  Read from each device once at the end: a check per site waits for the device at each one
    checks: list[tuple[str, SiteSpec, torch.Tensor | bool]] = []
    what = {weight: f"the weight '{weight}' of site '{terms[0][2].name}'" for weight, terms in updates.items()}
    for weight, terms in updates.items():
        merged[weight] = merged_weight(dense(full(get_parameter(gm, weight)), what[weight]), terms, dtype=dtype)
        checks += [(part, spec, _finite(t)) for A, B, spec, coeff in terms if abs(coeff * spec.scale) < _TINY
                   for part, t in (("lora_A", A), ("lora_B", B))]
        checks.append(("merged", terms[0][2], _finite(merged[weight])))
    on_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for _, _, ok in checks:
        if isinstance(ok, torch.Tensor):
            on_device[ok.device].append(ok)
    if not all(ok for _, _, ok in checks if not isinstance(ok, torch.Tensor)) or not all(
        bool(torch.stack(flags).all()) for flags in on_device.values()
    ):
        part, spec = next((part, spec) for part, spec, ok in checks if not bool(ok))  # the first, in fold order
        factor = (part, spec) if part != "merged" else _bad_factor(updates, spec)
        if factor is not None:
            part, spec = factor
            raise FoldError(
                f"folding site '{spec.name}' ({spec.rule}): the {part} of adapter '{spec.adapter}' holds NaN or Inf "
                "(diverged training?). Nothing was folded; reload a good checkpoint."
            )
        raise FoldError(
            f"folding site '{spec.name}' ({spec.rule}) gives non-finite weights: its base weight holds NaN or Inf, "
            "or the merged weight overflows its dtype. Nothing was folded; reload a good checkpoint."
        )
    if requantize is not None:
        for weight in updates:
            if is_quantized(full(get_parameter(gm, weight))):
                merged[weight] = requantized(merged[weight], requantize, what[weight])
    return merged


#: a GEMM's alpha below this is zero in float32, where BLAS need not read the factors
_TINY = torch.finfo(torch.float32).tiny


def _bad_factor(updates: Mapping[str, list], site: SiteSpec) -> tuple[str, SiteSpec] | None:
    """``(factor, spec)`` of the first term at ``site``'s weight whose factor holds NaN or Inf, for the error
    message once a merged weight is known to be non-finite (read here, on the error path only)."""
    for A, B, spec, _ in updates[site.weight]:
        for part, t in (("lora_A", A), ("lora_B", B)):
            if not bool(_finite(t)):
                return part, spec
    return None


def _finite(w: torch.Tensor) -> torch.Tensor | bool:
    """Whether every element of ``w`` is finite: a bool, or a 0-d bool tensor on ``w``'s device (read by the
    caller once for all weights).  True on ``meta``, where there are no values."""
    if w.device.type == "meta" or w.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(w)  # one read, NaN propagates to both; isfinite(w).all() writes a mask of w's size
    except (RuntimeError, NotImplementedError):  # dtypes aminmax does not support (complex, some float8)
        return torch.isfinite(w).all()
    return torch.isfinite(lo) & torch.isfinite(hi)


def fold(
    gm: GraphModule,
    dtype: torch.dtype | None = None,
    weights: Mapping[str, float] | None = None,
    requantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PassResult:
    """Run :class:`FoldPass` on ``gm`` (in place)."""
    return FoldPass(dtype, weights, requantize)(gm)
