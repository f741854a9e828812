"""Adapter passes: choose which adapters' branches the graph runs, and remove an adapter.

A rewritten graph module may hold several adapters (:mod:`fxlora.provenance` records them all, with
their sites); the graph itself holds the branches of the *active* ones only, chained at each site
(``base -> add(., y_a) -> add(., y_b)``).  An inactive adapter is therefore not computed at all: its
parameters stay registered on the module, but no node reads them.

* :class:`SetActiveAdapters` removes the branches of adapters that are no longer active (splicing each
  ``add`` out of its chain) and adds the branches of newly active ones, at every call of each of their
  sites, with :func:`fxlora.passes.rewrite_pass.add_branch`; sibling fusion is re-run where the module
  was rewritten with it.  Switching re-generates the module's code, never re-captures the model.
* :class:`RemoveAdapter` removes one adapter: its branches, its parameters and dropout modules, and its
  records.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule, Node

from fxlora import provenance

from .fuse_siblings_pass import FuseSiblings
from .infra import FxLoraPass, PassResult, check_contract, counters, finalize
from .rewrite_pass import add_branch
from .train_modules import drop_copies, restore, retarget

__all__ = ["SetActiveAdapters", "RemoveAdapter", "set_active_adapters", "remove_adapter", "adapter_nodes", "drop_branches"]


def adapter_nodes(gm: GraphModule, adapter: str) -> list[Node]:
    """The nodes of ``adapter``'s branches, in graph order."""
    return [n for n in gm.graph.nodes if (info := provenance.node_info(n)) is not None and info["adapter"] == adapter]


def drop_branches(gm: GraphModule, adapter: str) -> bool:
    """Remove ``adapter``'s branch nodes, splicing each ``add`` out of its site's chain."""
    nodes = adapter_nodes(gm, adapter)
    for node in nodes:
        if provenance.node_info(node)["role"] == provenance.ADD:
            node.replace_all_uses_with(node.args[0])
    for node in reversed(nodes):
        gm.graph.erase_node(node)
    return bool(nodes)


def _base_calls(gm: GraphModule) -> dict[str, list[tuple[Node, int | str]]]:
    """site -> [(call node, where it takes the branch input)], in graph order."""
    calls: dict[str, list[tuple[Node, int | str]]] = {}
    for node in gm.graph.nodes:
        info = provenance.node_info(node)
        if info is not None and info["role"] == provenance.BASE:
            calls.setdefault(info["site"], []).append((node, info["input"]))
    return calls


class SetActiveAdapters(FxLoraPass):
    """Make exactly ``names`` (in that order) the active adapters of the graph."""

    name = "set_active_adapters"

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        known = provenance.adapters_of(gm)
        check_contract(all(n in known for n in self.names), f"unknown adapters in {self.names}")
        check_contract(len(set(self.names)) == len(self.names), f"adapters named twice in {self.names}")

    def call(self, gm: GraphModule) -> PassResult:
        state = provenance.adapter_state(gm)
        if state["active"] == self.names:
            return PassResult(gm, False)
        # Rebuild every chain in the new order, so that the graph for an active list is the same whatever
        # the history: drop all branches, then add them last adapter first (each add goes right after the
        # base call, so the chain reads base -> names[0] -> names[1] ...).
        for name in state["active"]:
            drop_branches(gm, name)
        calls = _base_calls(gm)
        adapters = provenance.adapters_of(gm)
        for name in reversed(self.names):
            for site, spec in adapters[name].items():
                for node, where in calls[site]:
                    add_branch(gm, spec, node, where)
        restore(gm)  # fully trained modules: the active adapters' copies
        retarget(gm, self.names)
        state["active"] = list(self.names)
        if state.get("fuse_siblings"):
            FuseSiblings().call(gm)
        counters[self.name]["switches"] += 1
        finalize(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        present = {info["adapter"] for n in gm.graph.nodes if (info := provenance.node_info(n)) and info["adapter"]}
        check_contract(present == set(self.names), f"the graph runs {sorted(present)}, not {self.names}")


class RemoveAdapter(FxLoraPass):
    """Remove ``adapter`` entirely: branches, parameters, dropout modules and records."""

    name = "remove_adapter"

    def __init__(self, adapter: str) -> None:
        super().__init__()
        self.adapter = adapter

    def call(self, gm: GraphModule) -> PassResult:
        state = provenance.adapter_state(gm)
        if state is None or self.adapter not in state["adapters"]:
            return PassResult(gm, False)
        drop_branches(gm, self.adapter)
        restore(gm)
        drop_copies(gm, self.adapter)
        retarget(gm, [a for a in state["active"] if a != self.adapter])
        for spec in state["adapters"][self.adapter].values():
            for qualname in (spec.lora_A, spec.lora_B, spec.dropout_module):
                if qualname is not None:
                    owner, _, attr = qualname.rpartition(".")
                    delattr(gm.get_submodule(owner), attr)
        del state["adapters"][self.adapter]
        if self.adapter in state["active"]:
            state["active"].remove(self.adapter)
        counters[self.name]["adapters"] += 1
        finalize(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        check_contract(not adapter_nodes(gm, self.adapter), f"adapter {self.adapter!r} left nodes in the graph")


def set_active_adapters(gm: GraphModule, names: Sequence[str]) -> PassResult:
    """Run :class:`SetActiveAdapters` on ``gm`` (in place)."""
    return SetActiveAdapters(names)(gm)


def remove_adapter(gm: GraphModule, adapter: str) -> PassResult:
    """Run :class:`RemoveAdapter` on ``gm`` (in place)."""
    return RemoveAdapter(adapter)(gm)
