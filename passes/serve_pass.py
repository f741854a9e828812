"""Serve pass: one graph that runs every sample of a batch with its own adapter.

Given N adapters of a rewritten graph module, this pass

1. removes every adapter's branches and parameters, and stacks their factors per site into parameters of
   its own (``<site>.lora_A_stack`` ``(N+1, R, in)``, ``<site>.lora_B_stack``, and the buffer
   ``<site>.lora_scale_stack`` ``(N+1, R)``; slot N is all zeros, for samples that run the base model),
   each adapter stored once, zero-padded to the site's largest rank; ``enable_lora`` sites keep their
   compact per-slice blocks (a constant one-hot ``<site>.lora_slices`` places them);
2. adds an ``adapter_ids`` input (one entry per sample, ``-1`` = base model only), one node that checks it
   and maps it to slots, and one that one-hot encodes the slots for every site;
3. after every call of every site adds one call of :func:`fxlora.lora.mixed_linear` (or
   ``mixed_embedding``): the site's output plus each sample's branch, with no loop over adapters (each
   sample's factors gathered into batched matmuls, or, for few rows per sample, every adapter in one
   GEMM with the other adapters' products masked out; see :mod:`fxlora.lora`).

The result is recorded in ``gm.meta["fxlora"]["served"]`` (:class:`ServedSite` per site), which the
state-dict helpers read to load or save one adapter's slot in place: no graph change, so a compiled
served module is not recompiled.
"""

from __future__ import annotations

import weakref

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from fxlora import calling, provenance
from fxlora.errors import ArgumentError
from fxlora.lora import SiteSpec, mixed_embedding, mixed_linear, mixed_onehot, mixed_weights
from fxlora.resolution import canonical_name

from .adapters_pass import drop_branches
from .train_modules import restore
from .infra import FxLoraPass, PassResult, check_contract, counters, finalize, module_at
from .rewrite_pass import input_of

__all__ = [
    "ServeAdapters",
    "ServedSite",
    "serve_adapters",
    "adapter_slots",
    "stack_factors",
    "read_slot",
    "write_slot",
    "IDS_INPUT",
]

IDS_INPUT = "adapter_ids"


@dataclass
class ServedSite:
    """Where a site's stacked factors live in a served module, and how each adapter fills its slot."""

    name: str
    kind: str  # "linear" | "embedding"
    A: str  # qualified names in the served module
    B: str
    scale: str
    slices: str | None  # enable_lora sites: the one-hot (n, k) placement buffer
    rank: int  # rank rows per block (the largest r among the adapters)
    blocks: int  # enable_lora: slice blocks (k, the union of the adapters' masks); else 1
    rows: int  # B's rows per block (o = out / n for enable_lora, else out)
    specs: dict[str, SiteSpec] = field(default_factory=dict)  # adapter -> its spec at this site
    block_of: dict[str, tuple[int, ...]] = field(default_factory=dict)  # adapter -> the block of each of its slices


_CHECKED: dict[int, tuple[weakref.ref, int, int]] = {}
"""id(adapter_ids) -> (a weak reference to it, its version counter, the adapter count) for the last few
device id tensors found in range: one passed again unchanged (each step of a generation loop) is not
read on the host again, so those calls make no device sync."""

_CHECKED_MAX = 16

READ_EVERY_CALL = frozenset({"cpu"})
"""Device types whose id tensors are read on the host on every call (reading them costs no device sync)."""


def _already_checked(adapter_ids: torch.Tensor, num_adapters: int) -> bool:
    entry = _CHECKED.get(id(adapter_ids))
    if entry is None or entry[0]() is not adapter_ids or entry[2] != num_adapters:
        return False
    try:
        return entry[1] == adapter_ids._version
    except RuntimeError:  # inference tensors have no version counter
        return False


def _remember(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    try:
        version = adapter_ids._version
    except RuntimeError:  # an inference tensor could change in place unnoticed: read on every call
        return
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[id(adapter_ids)] = (weakref.ref(adapter_ids), version, num_adapters)


def _assert_in_range(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    torch._assert_async(
        ((adapter_ids >= -1) & (adapter_ids < num_adapters)).all(),
        f"adapter_ids out of range: use 0..{num_adapters - 1}, or -1 for the base model",
    )


def adapter_slots(adapter_ids: torch.Tensor, num_adapters: int) -> torch.Tensor:
    """``adapter_ids`` checked and mapped to stack slots (``-1`` -> ``num_adapters``, the base slot).

    Eagerly the range check reads the ids on the host: on every call for CPU tensors; for tensors on a
    device, where reading waits for it, once per tensor, and a tensor passed again with the same version
    counter is checked by a device-side assert instead (a write that bypasses the version counter, such
    as through ``.data``, then fails loudly rather than picking another adapter).  Under
    ``torch.compile``, and while a CUDA graph is captured, the check is always the device-side assert (so a
    graph's replays check the ids then in its input buffer)."""
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dim() != 1 or adapter_ids.dtype not in (
        torch.int64, torch.int32
    ):
        got = adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
        shape = tuple(adapter_ids.shape) if isinstance(adapter_ids, torch.Tensor) else ""
        raise ArgumentError(
            f"adapter_ids must be a 1-D int64 or int32 tensor with one entry per sample (an index into the "
            f"served adapters, -1 for the base model), got {got} {shape}."
        )
    if torch.jit.is_tracing():
        raise ArgumentError(
            "torch.jit.trace cannot keep a served module's adapter_ids check (a trace drops a check whose result "
            "it does not use, so out-of-range ids would run unchecked): use torch.compile or torch.export, "
            "which keep it, or fold each adapter (fxlora.fold) and trace the folded modules."
        )
    if torch.compiler.is_compiling() or (adapter_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        # no host sync under compile or while a CUDA graph is captured (each replay checks on the device)
        _assert_in_range(adapter_ids, num_adapters)
    elif adapter_ids.numel():
        every_call = adapter_ids.device.type in READ_EVERY_CALL
        if every_call or not _already_checked(adapter_ids, num_adapters):
            low, high = torch.stack(torch.aminmax(adapter_ids)).tolist()  # a device sync off the CPU
            if low < -1 or high >= num_adapters:
                raise ArgumentError(
                    f"adapter_ids holds {low}..{high}, but this module serves "
                    f"{num_adapters} adapters: use 0..{num_adapters - 1}, or -1 for the base model."
                )
            if not every_call:
                _remember(adapter_ids, num_adapters)
        else:
            _assert_in_range(adapter_ids, num_adapters)
    return torch.where(adapter_ids == -1, num_adapters, adapter_ids).long()


def _layout(gm: GraphModule, site: str, specs: dict[str, SiteSpec]) -> ServedSite:
    kinds = {s.kind for s in specs.values()}
    if kinds - {"linear", "embedding"} or len(kinds) != 1:
        raise ArgumentError(
            f"serve: site '{site}' is a {'/'.join(sorted(kinds))} site; mixed batches support linear and embedding "
            "sites (fold, or fxlora.set_adapter, for the others)."
        )
    kind = kinds.pop()
    masks = {s.enable_lora for s in specs.values()}
    first = next(iter(specs.values()))
    stem = canonical_name(first.lora_A, first.adapter).rpartition("lora_A")[0]
    names = dict(A=f"{stem}lora_A_stack", B=f"{stem}lora_B_stack", scale=f"{stem}lora_scale_stack")
    rank = max(s.r for s in specs.values())
    if masks == {None}:
        return ServedSite(site, kind, **names, slices=None, rank=rank, blocks=1, rows=first.out_features,
                          specs=dict(specs), block_of={a: (0,) for a in specs})
    if None in masks or len({len(m) for m in masks}) != 1:
        raise ArgumentError(
            f"serve: at site '{site}' some adapters use enable_lora and others do not (or with different slice "
            "counts); serve them separately, or rewrite them with the same kind of rule."
        )
    n = len(next(iter(masks)))
    union = [any(m[i] for m in masks) for i in range(n)]
    enabled = [i for i in range(n) if union[i]]
    block_of = {a: tuple(enabled.index(i) for i in range(n) if s.enable_lora[i]) for a, s in specs.items()}
    return ServedSite(site, kind, **names, slices=f"{stem}lora_slices", rank=rank, blocks=len(enabled),
                      rows=first.out_features // n, specs=dict(specs), block_of=block_of)


def stack_factors(gm: GraphModule, layout: ServedSite, adapters: list[str]) -> tuple[torch.Tensor, ...]:
    """The site's stacked ``(A, B, scale)`` (and the slices placement) from the adapters' own factors."""
    first = next(iter(layout.specs.values()))
    W = gm.get_parameter(first.weight)
    n1, R, k, o = len(adapters) + 1, layout.rank, layout.blocks, layout.rows
    factory = {"dtype": W.dtype, "device": W.device}
    A = torch.zeros(n1, k * R, first.in_features, **factory)
    B = torch.zeros(k * o, n1, R, **factory).transpose(0, 1)  # out-major: all slots are one (out, n1*R) view
    scale = torch.zeros(n1, k * R, **factory)
    for slot, adapter in enumerate(adapters):
        spec = layout.specs.get(adapter)
        if spec is None:
            continue
        a, b = gm.get_parameter(spec.lora_A).detach(), gm.get_parameter(spec.lora_B).detach()
        for g, block in enumerate(layout.block_of[adapter]):
            A[slot, block * R : block * R + spec.r] = a[g * spec.r : (g + 1) * spec.r]
            B[slot, block * o : (block + 1) * o, : spec.r] = b[g * o : (g + 1) * o]
            scale[slot, block * R : block * R + spec.r] = spec.scale
    if layout.slices is None:
        return A, B, scale
    n = len(first.enable_lora)
    union = [i for i in range(n) if any(s.enable_lora[i] for s in layout.specs.values())]
    slices = torch.zeros(n, k, **factory)
    for g, i in enumerate(union):
        slices[i, g] = 1
    return A, B, scale, slices


def _slot(gm: GraphModule, adapter: str):
    """``(spec, layout, A, B)`` for each site ``adapter`` adapts in a served module: ``A`` and ``B`` are
    views of its slot of the site's stacks."""
    served = provenance.adapter_state(gm)["served"]
    slot = served["adapters"].index(adapter)
    for layout in served["sites"].values():
        spec = layout.specs.get(adapter)
        if spec is not None:
            yield spec, layout, gm.get_parameter(layout.A)[slot], gm.get_parameter(layout.B)[slot]


def read_slot(gm: GraphModule, adapter: str) -> dict[str, torch.Tensor]:
    """``adapter``'s own factors, by the names its spec gives them (``q.lora_A_b``), read out of its slot
    of a served module's stacks (views: the compact ``(r*k, in)`` / ``(o*k, r)`` layouts)."""
    out = {}
    for spec, layout, A, B in _slot(gm, adapter):
        R, o, blocks = layout.rank, layout.rows, layout.block_of[adapter]
        out[spec.lora_A] = torch.cat([A[b * R : b * R + spec.r] for b in blocks], 0)
        out[spec.lora_B] = torch.cat([B[b * o : (b + 1) * o, : spec.r] for b in blocks], 0)
    return out


def write_slot(gm: GraphModule, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``adapter``'s factors (named as :func:`read_slot` names them) into its slot, in place: the
    graph and the stacks' identities do not change, so a compiled served module is not recompiled."""
    with torch.no_grad():
        for spec, layout, A, B in _slot(gm, adapter):
            R, o = layout.rank, layout.rows
            for g, b in enumerate(layout.block_of[adapter]):
                if spec.lora_A in tensors:
                    A[b * R : b * R + spec.r].copy_(tensors[spec.lora_A][g * spec.r : (g + 1) * spec.r])
                if spec.lora_B in tensors:
                    B[b * o : (b + 1) * o, : spec.r].copy_(tensors[spec.lora_B][g * o : (g + 1) * o])


def _shared_weights(gm: GraphModule, layouts: dict[str, ServedSite], onehot: Node, slots: Node) -> dict[str, Node]:
    """One :func:`fxlora.lora.mixed_weights` node per distinct ``row_scale`` of the linear sites (usually
    one: the adapters' alpha/r do not change from site to site), computed once per forward; site -> node."""
    shared: list[tuple[torch.Tensor, Node]] = []
    out = {}
    cursor = onehot
    for site, layout in layouts.items():
        if layout.kind != "linear":
            continue
        scale = gm.get_buffer(layout.scale)
        for other, node in shared:
            if other.dtype == scale.dtype and other.device == scale.device and torch.equal(other, scale):
                break
        else:
            with gm.graph.inserting_after(cursor):
                getter = gm.graph.get_attr(layout.scale)
            with gm.graph.inserting_after(getter):
                node = gm.graph.call_function(mixed_weights, (onehot, slots, getter))
            cursor = node
            shared.append((scale, node))
        out[site] = node
    return out


def _add_ids_input(gm: GraphModule) -> Node:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(next(iter(graph.nodes))):
        ids = graph.placeholder(IDS_INPUT)
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:  # torch.export graphs: (args, kwargs) in a pytree
        args, kwargs = pytree.tree_unflatten([object()] * info.in_spec.num_leaves, info.in_spec)
        _, in_spec = pytree.tree_flatten((args, {**kwargs, IDS_INPUT: object()}))
        info = info._replace(orig_args=[*info.orig_args, IDS_INPUT], in_spec=in_spec)
        if isinstance(codegen, calling.CallingCodeGen):  # called like the original model: one more keyword
            graph._codegen = calling.with_keyword_input(codegen, info, IDS_INPUT)
        else:
            codegen.pytree_info = info
    return ids


class ServeAdapters(FxLoraPass):
    """Turn a rewritten graph module into a mixed-batch module serving ``adapters`` (see the module
    docstring)."""

    name = "serve_adapters"

    def __init__(self, adapters: list[str]) -> None:
        super().__init__()
        self.adapters = list(adapters)

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        known = provenance.adapters_of(gm)
        check_contract(bool(self.adapters) and all(a in known for a in self.adapters), f"unknown adapters {self.adapters}")
        check_contract("served" not in provenance.adapter_state(gm), "the module already serves a mixed batch")

    def call(self, gm: GraphModule) -> PassResult:
        state = provenance.adapter_state(gm)
        known = provenance.adapters_of(gm)
        per_site: dict[str, dict[str, SiteSpec]] = {}
        for adapter in self.adapters:
            for site, spec in known[adapter].items():
                per_site.setdefault(site, {})[adapter] = spec
        layouts = {site: _layout(gm, site, specs) for site, specs in per_site.items()}  # refuse before changing
        stacks = {site: stack_factors(gm, layout, self.adapters) for site, layout in layouts.items()}

        for adapter in state["active"]:
            drop_branches(gm, adapter)
        restore(gm)  # the base modules, not an active adapter's copy of a module it trains in full
        for specs in known.values():  # every adapter's own factors go: the stacks hold the served ones
            for spec in specs.values():
                for qualname in (spec.lora_A, spec.lora_B, spec.dropout_module):
                    if qualname is not None:
                        owner, _, attr = qualname.rpartition(".")
                        delattr(gm.get_submodule(owner), attr)
        for site, layout in layouts.items():
            tensors = stacks[site]
            for qualname, value, trainable in zip(
                (layout.A, layout.B, layout.scale, layout.slices), tensors, (True, True, False, False)
            ):
                owner, _, attr = qualname.rpartition(".")
                if trainable:
                    module_at(gm, owner).register_parameter(attr, nn.Parameter(value))
                else:
                    module_at(gm, owner).register_buffer(attr, value)

        graph = gm.graph
        ids = _add_ids_input(gm)
        with graph.inserting_after(ids):
            slots = graph.call_function(adapter_slots, (ids, len(self.adapters)))
        with graph.inserting_after(slots):
            dtype = gm.get_parameter(next(iter(layouts.values())).A).dtype if layouts else torch.get_default_dtype()
            onehot = graph.call_function(mixed_onehot, (slots, len(self.adapters) + 1, dtype))
        weights = _shared_weights(gm, layouts, onehot, slots)
        calls: dict[str, list[tuple[Node, int | str]]] = {}
        for node in graph.nodes:
            info = provenance.node_info(node)
            if info is not None and info["role"] == provenance.BASE:
                calls.setdefault(info["site"], []).append((node, info["input"]))
        for site, layout in layouts.items():
            for node, where in calls[site]:
                _add_mixed_branch(gm, layout, node, input_of(node, where), slots, weights.get(site))
        state["served"] = {"adapters": list(self.adapters), "sites": layouts}
        state["active"] = list(self.adapters)
        counters[self.name]["sites"] += len(layouts)
        finalize(gm)
        return PassResult(gm, True)


def _add_mixed_branch(gm, layout: ServedSite, node: Node, x: Node, slots: Node, weights: Node) -> None:
    """``node`` (a call of the site) replaced, for its users, by one call of the mixed-batch math of
    :mod:`fxlora.lora` that adds each sample's branch to it."""
    graph = gm.graph
    first = next(iter(layout.specs.values()))
    with graph.inserting_before(node.next):
        if layout.kind == "linear":
            new = [graph.get_attr(q) for q in (layout.A, layout.B) + ((layout.slices,) if layout.slices else ())]
            # a module's output may be kept by its forward hooks: only a function's is added into in place
            fresh = node.op in ("call_function", "call_method")
            out = graph.call_function(
                mixed_linear, (node, x, slots, weights, *new), {"site": layout.name, "add_in_place": fresh}
            )
        else:
            new = [graph.get_attr(q) for q in (layout.A, layout.B, layout.scale)]
            out = graph.call_function(
                mixed_embedding, (node, x, slots, *new, first.op.get("padding_idx")), {"site": layout.name}
            )
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    for added in (*new, out):
        added.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        added.meta[provenance.META_KEY] = {"site": layout.name, "adapter": None, "role": provenance.MIXED, "spec": first}


def serve_adapters(gm: GraphModule, adapters: list[str]) -> PassResult:
    """Run :class:`ServeAdapters` on ``gm`` (in place)."""
    return ServeAdapters(adapters)(gm)
