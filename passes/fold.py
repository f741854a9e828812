"""Fold pass: constant-fold every LoRA branch into its base weight.

For each site recorded in the graph it computes ``W + delta(A, B) * scale`` in float32 (float64 for
float64 weights), rounds it once to ``W``'s dtype (or to ``dtype`` when given), installs it as a *new*
parameter in place of the base weight, erases exactly the nodes the rewrite pass added, and removes
the LoRA parameters and dropout modules.  The result is the base model's graph, node for node.

It never writes into an existing tensor: run on a copy (as :func:`fxlora.fold` does), it leaves the
original graph module, its LoRA parameters and its base weights bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from fxlora.errors import FoldError
from fxlora.lora import META_KEY, graph_sites, merged_weight

from ._graph import finalize


def fold(gm: GraphModule, dtype: torch.dtype | None = None) -> PassResult:
    """Fold ``gm``'s LoRA branches into its weights, in place."""
    sites = graph_sites(gm)
    if not sites:
        return PassResult(gm, False)
    merged: dict[str, torch.Tensor] = {}
    for spec in sites.values():  # compute and check everything before changing anything
        W = gm.get_parameter(spec.weight)
        w = merged_weight(W, gm.get_parameter(spec.lora_A), gm.get_parameter(spec.lora_B), spec, dtype=dtype)
        if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
            raise FoldError(
                f"folding site '{spec.name}' ({spec.rule}) gives non-finite weights: its lora_A/lora_B or base "
                "weight hold NaN or Inf (diverged training?). Nothing was folded; reload a good checkpoint."
            )
        merged[spec.weight] = w

    for spec in sites.values():
        owner, _, attr = spec.weight.rpartition(".")
        old = gm.get_parameter(spec.weight)
        setattr(gm.get_submodule(owner), attr, nn.Parameter(merged[spec.weight], requires_grad=old.requires_grad))

    graph = gm.graph
    for node in list(graph.nodes):
        info = node.meta.get(META_KEY)
        if info is not None and info["role"] == "add":
            node.replace_all_uses_with(node.args[0])
    for node in reversed(list(graph.nodes)):
        info = node.meta.get(META_KEY)
        if info is None:
            continue
        if info["role"] == "base":
            del node.meta[META_KEY]
        else:
            graph.erase_node(node)

    for spec in sites.values():
        for qualname in (spec.lora_A, spec.lora_B, spec.dropout_module):
            if qualname is None:
                continue
            owner, _, attr = qualname.rpartition(".")
            delattr(gm.get_submodule(owner), attr)
    finalize(gm)
    return PassResult(gm, True)
