""":func:`serve`: one module that runs each sample of a batch with its own adapter.

``server = fxlora.serve(gm, adapters=["sst2", "mnli"])`` returns a new module whose forward takes the
model's inputs plus ``adapter_ids``, a LongTensor with one entry per sample (an index into
``adapters``, ``-1`` for the base model alone), and applies each sample's adapter in one graph
(``fxlora.passes.ServeAdapters``): stacked factors gathered by ``adapter_ids`` and batched matmuls, no
loop over adapters, no re-trace when the ids change.  It trains too: a mixed batch backpropagates into
each sample's own adapter (without LoRA dropout, which a served module does not apply; ``serve`` warns).  ``fxlora.lora_state_dict(server, adapter=...)`` / ``load_lora(server,
path, adapter=...)`` read and write one adapter's slot in place (no graph change, so a compiled server
is not recompiled).

Activations must be batch-major (the rows of sample 0 first), as in Hugging Face models; for a graph
captured with torch.export fxlora checks it on the recorded shapes, and every site checks at run time
that its rows split evenly over the samples.
"""

from __future__ import annotations

import warnings

from collections.abc import Sequence

import torch
from torch.fx import GraphModule

from .errors import ArgumentError
from .graph_module import LoraGraphModule
from .named_adapters import check_not_split
from .passes import ServeAdapters
from .provenance import BASE, adapter_state, adapters_of, node_info, require_sites
from .tracing import copy_graph_module

__all__ = ["serve", "is_served"]


def is_served(gm: object) -> bool:
    """Whether ``gm`` was made by :func:`serve`."""
    return isinstance(gm, GraphModule) and "served" in (getattr(gm, "meta", {}).get("fxlora") or {})


def serve(gm: GraphModule, adapters: Sequence[str] | None = None) -> LoraGraphModule:
    """A new module that serves ``adapters`` (default: all of ``gm``'s, in order) in mixed batches (see
    the module docstring); ``gm`` is not modified.  The stacked LoRA factors train; the base is frozen."""
    require_sites(gm, "serve")
    check_not_split(gm, "serve")
    if is_served(gm):
        raise ArgumentError("serve: this module already serves a mixed batch; serve the module it was made from.")
    known = adapters_of(gm)
    names = list(known) if adapters is None else list(adapters) if not isinstance(adapters, str) else [adapters]
    if not names:
        raise ArgumentError("serve needs at least one adapter.")
    for name in names:
        if name not in known:
            raise ArgumentError(f"serve: no adapter named {name!r}; this module has {', '.join(map(repr, known))}.")
    if len(set(names)) != len(names):
        raise ArgumentError(f"serve: an adapter is named twice in {names}.")
    trained = [n for n in names if adapter_state(gm).get("train_modules", {}).get(n)]
    if trained:
        raise ArgumentError(
            f"serve: adapter {trained[0]!r} trains modules in full (train_modules), which mixed batches do not support; "
            "serve adapters made of LoRA factors only, or fold each adapter."
        )
    _check_batch_major(gm, names)
    with_dropout = sorted({n for n in names for spec in known[n].values() if spec.dropout > 0})
    if with_dropout:
        warnings.warn(
            f"serve: adapter(s) {', '.join(map(repr, with_dropout))} use LoRA dropout, which a served module does not "
            "apply: its forward, in train mode too, is that of eval mode (train with dropout through "
            "fxlora.set_adapter on this module instead).",
            stacklevel=2,
        )
    out = copy_graph_module(gm, LoraGraphModule)
    ServeAdapters(names)(out)
    for p in out.parameters():
        p.requires_grad_(False)
    for layout in adapter_state(out)["served"]["sites"].values():
        out.get_parameter(layout.A).requires_grad_(True)
        out.get_parameter(layout.B).requires_grad_(True)
    out.train(gm.training)
    return out


def _check_batch_major(gm: GraphModule, names: list[str]) -> None:
    """On a torch.export graph (shapes recorded as ``node.meta["val"]``), every served site's input must
    have the batch dimension of the first input leading, alone or flattened with what follows it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    if not placeholders or placeholders[0].meta["val"].dim() == 0:
        return
    batch = placeholders[0].meta["val"].shape[0]
    if not isinstance(batch, torch.SymInt):
        return
    batch_symbols = batch.node.expr.free_symbols
    sites = {site for name in names for site in adapters_of(gm)[name]}
    for node in gm.graph.nodes:
        info = node_info(node)
        if info is None or info["role"] != BASE or info["site"] not in sites:
            continue
        where = info["input"]
        x = node.args[where] if isinstance(where, int) else node.kwargs[where]
        val = getattr(x, "meta", {}).get("val")
        if not isinstance(val, torch.Tensor) or val.dim() == 0:
            continue
        lead = val.shape[0]
        if not (isinstance(lead, torch.SymInt) and batch_symbols & lead.node.expr.free_symbols):
            raise ArgumentError(
                f"serve: the input of site '{info['site']}' has shape {tuple(val.shape)}, whose first dimension is not "
                "the batch dimension of the model's first input; mixed batches need batch-major activations."
            )
