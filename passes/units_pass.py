"""Unit passes: give a flat captured graph its model's block structure back, and take it away again.

A captured graph is flat: it reads ``blocks.0.attn.qkv.weight`` directly and never calls
``blocks.0.forward``.  Engines that work per module (FSDP2's ``fully_shard`` gathers a block's weights
before its forward and frees them after; activation checkpointing recomputes a block) need that forward
to run.  :class:`SplitUnits` moves the nodes of each *unit* (a module path, typically each transformer
block) into a graph module of their own, registered at that path, and calls it from the outer graph:

* a node belongs to unit ``U`` when ``U`` is in its ``nn_module_stack`` (every node a module's forward
  records, the LoRA branches the rewrite pass added included), or when it reads an attribute under
  ``U`` (``get_attr``);
* the unit graph module is built over the module that was at ``U``, so every parameter keeps its
  qualified name (``blocks.0.attn.qkv.lora_A``): state dicts, checkpoints and fxlora's records are
  unchanged;
* the unit's inputs are the values its nodes read from outside, its outputs the values read outside.

:class:`InlineUnits` is the inverse (what fold, which returns the flat base graph, runs first).  The
unit paths are recorded in ``gm.meta["fxlora"]["units"]``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxlora import provenance
from fxlora.errors import ArgumentError

from .infra import FxLoraPass, PassResult, check_contract, counters, finalize

__all__ = ["SplitUnits", "InlineUnits", "split_units", "inline_units", "unit_paths"]


def unit_paths(gm: GraphModule) -> list[str]:
    """The units ``gm`` is split into (empty for a flat graph)."""
    state = provenance.adapter_state(gm) if provenance.is_rewritten(gm) else (getattr(gm, "meta", {}).get("fxlora") or {})
    return list(state.get("units", []))


def _stack_paths(node: Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] for value in stack.values() if isinstance(value, tuple) and isinstance(value[0], str)]


def _belongs(node: Node, unit: str) -> bool:
    if node.op in ("placeholder", "output"):
        return False
    if node.op in ("get_attr", "call_module") and isinstance(node.target, str) and node.target.startswith(unit + "."):
        return True
    return unit in _stack_paths(node)


def _split_one(gm: GraphModule, unit: str) -> None:
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = [n for n in graph.nodes if _belongs(n, unit)]
    if not nodes:
        raise ArgumentError(f"unit '{unit}' runs no node of the captured graph (unused, or kept opaque inside another module).")
    inside = set(nodes)
    inputs: list[Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    first_use = min((order[u] for o in outputs for u in o.users if u not in inside), default=len(order))
    last_input = max((order[i] for i in inputs), default=-1)
    if last_input >= first_use:
        raise ArgumentError(
            f"unit '{unit}' is not a contiguous part of the graph (its outputs are read before all its inputs are "
            "computed); choose units that run one after another, such as the blocks of a transformer."
        )
    sub = Graph()
    env: dict[Node, Node] = {}
    for i in inputs:
        placeholder = sub.placeholder(i.name)
        placeholder.meta = dict(i.meta)
        env[i] = placeholder
    prefix = unit + "."
    for n in nodes:
        copy = sub.node_copy(n, lambda a: env[a])
        if n.op in ("get_attr", "call_module"):
            copy.target = n.target[len(prefix):]
        env[n] = copy
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    owner_path, _, attr = unit.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    container = owner._modules[attr]
    types = getattr(gm, "meta", {}).get("fxlora_module_types") or {}
    unit_gm = GraphModule(container, sub, class_name=getattr(types.get(unit), "__name__", type(container).__name__))
    unit_gm.meta["fxlora_unit"] = unit
    owner._modules[attr] = unit_gm

    anchor = min((u for o in outputs for u in o.users if u not in inside), key=order.__getitem__, default=None)
    with graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(nodes[-1]):
        call = graph.call_module(unit, tuple(inputs))
        call.meta["nn_module_stack"] = {"fxlora_unit": (unit, type(container))}
        results = [call] if len(outputs) == 1 else [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for old, new in zip(outputs, results):
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)


class SplitUnits(FxLoraPass):
    """Move each unit's nodes into a graph module at the unit's path (see the module docstring)."""

    name = "split_units"

    def __init__(self, units: Sequence[str]) -> None:
        super().__init__()
        self.units = list(units)

    def call(self, gm: GraphModule) -> PassResult:
        done = unit_paths(gm)
        todo = [u for u in self.units if u not in done]
        if not todo:
            return PassResult(gm, False)
        for unit in todo:
            _split_one(gm, unit)
        provenance.adapter_state(gm).setdefault("units", []).extend(todo)
        counters[self.name]["units"] += len(todo)
        finalize(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        for unit in self.units:
            module = gm.get_submodule(unit)
            check_contract(isinstance(module, GraphModule), f"unit '{unit}' is not a graph module")
            module.graph.lint()


def _inline_one(gm: GraphModule, unit: str) -> None:
    graph = gm.graph
    unit_gm = gm.get_submodule(unit)
    for call in [n for n in graph.nodes if n.op == "call_module" and n.target == unit]:
        env: dict[Node, Node] = {}
        placeholders = [n for n in unit_gm.graph.nodes if n.op == "placeholder"]
        for p, a in zip(placeholders, call.args):
            env[p] = a
        result = None
        with graph.inserting_before(call):
            for n in unit_gm.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    result = n.args[0]
                    continue
                copy = graph.node_copy(n, lambda a: env[a])
                if n.op in ("get_attr", "call_module"):
                    copy.target = f"{unit}.{n.target}"
                env[n] = copy
        mapped = result if isinstance(result, Node) else None
        if mapped is not None:
            call.replace_all_uses_with(env[mapped])
        else:
            for user in list(call.users):  # getitem(call, i)
                user.replace_all_uses_with(env[result[user.args[1]]])
                graph.erase_node(user)
        graph.erase_node(call)
    owner_path, _, attr = unit.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    container = nn.Module()  # the flat graph reads the unit's modules and tensors by qualified name
    container._modules = dict(unit_gm._modules)
    container._parameters = dict(unit_gm._parameters)
    container._buffers = dict(unit_gm._buffers)
    owner._modules[attr] = container


class InlineUnits(FxLoraPass):
    """Put every unit's nodes back into the outer graph: the inverse of :class:`SplitUnits`.

    Ensures no unit is left (no graph-module submodule is called) and the state dict's keys are the
    ones it was given."""

    name = "inline_units"

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        self._keys = list(gm.state_dict())

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        check_contract(not unit_paths(gm), f"inline_units left units {unit_paths(gm)}")
        check_contract(
            not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), GraphModule) for n in gm.graph.nodes),
            "inline_units left a call of a graph-module unit",
        )
        check_contract(sorted(gm.state_dict()) == sorted(self._keys), "inline_units changed the state dict's keys")

    def call(self, gm: GraphModule) -> PassResult:
        units = unit_paths(gm)
        if not units:
            return PassResult(gm, False)
        for unit in reversed(units):
            _inline_one(gm, unit)
        provenance.adapter_state(gm).pop("units", None)
        counters[self.name]["units"] += len(units)
        finalize(gm)
        return PassResult(gm, True)


def split_units(gm: GraphModule, units: Sequence[str]) -> PassResult:
    """Run :class:`SplitUnits` on ``gm`` (in place)."""
    return SplitUnits(units)(gm)


def inline_units(gm: GraphModule) -> PassResult:
    """Run :class:`InlineUnits` on ``gm`` (in place)."""
    return InlineUnits()(gm)
