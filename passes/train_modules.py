"""Fully trained modules beside the LoRA factors (PEFT's ``modules_to_save``), in the graph.

Each adapter that trains a module ``P`` gets its own copy of it, registered at ``P_<adapter>``
(:func:`fxlora.resolution.train_module_copy`).  The graph reads ``P`` through ``call_module`` nodes
(``P`` or a submodule of it) and ``get_attr`` nodes (its parameters and buffers); while the adapter is
active, those nodes read the copy instead (their original target is kept in
``node.meta["fxlora_train"]``), so switching adapters switches the module, and an inactive copy is
not read at all.  The rewrite, adapter and fold passes call these helpers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from torch import nn
from torch.fx import Graph, GraphModule

from fxlora import provenance
from fxlora.resolution import train_module_copy

from .infra import module_at

__all__ = ["register_copies", "retarget", "restore", "restore_targets", "trained_by", "drop_copies", "adopt_copy", "TRAIN_META"]

#: ``node.meta`` key holding a retargeted node's original target.
TRAIN_META = "fxlora_train"


def trained_by(gm: GraphModule) -> dict[str, dict[str, str]]:
    """adapter -> {module path -> path of the adapter's copy}."""
    return provenance.adapter_state(gm).setdefault("train_modules", {})


def register_copies(gm: GraphModule, adapter: str, paths: Iterable[str]) -> None:
    """Give ``adapter`` its own trainable copy of each module in ``paths``."""
    record = trained_by(gm).setdefault(adapter, {})
    for path in paths:
        original = gm.get_submodule(path)
        duplicate = copy.deepcopy(original)
        for p in duplicate.parameters():
            p.requires_grad_(True)
        owner, _, attr = train_module_copy(path, adapter).rpartition(".")
        module_at(gm, owner).add_module(attr, duplicate)
        record[path] = train_module_copy(path, adapter)


def _under(target: str, path: str) -> bool:
    return target == path or target.startswith(path + ".")


def restore(gm: GraphModule) -> bool:
    """Point every retargeted node back at the original module; returns whether anything changed."""
    return restore_targets(gm.graph)


def restore_targets(graph: Graph) -> bool:
    """:func:`restore` on a graph."""
    changed = False
    for node in graph.nodes:
        original = node.meta.pop(TRAIN_META, None)
        if original is not None:
            node.target = original
            changed = True
    return changed


def retarget(gm: GraphModule, adapters: Iterable[str]) -> bool:
    """Make the graph read the copies of the modules that ``adapters`` train (one adapter per module:
    the caller checks); returns whether anything changed."""
    mapping = {path: dest for adapter in adapters for path, dest in trained_by(gm).get(adapter, {}).items()}
    changed = False
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or TRAIN_META in node.meta:
            continue
        info = provenance.node_info(node)
        if info is not None and info["role"] != provenance.BASE:
            continue  # a LoRA branch's own read
        for path, dest in mapping.items():
            if _under(node.target, path):
                node.meta[TRAIN_META] = node.target
                node.target = dest + node.target[len(path):]
                changed = True
                break
    return changed


def drop_copies(gm: GraphModule, adapter: str) -> None:
    """Remove ``adapter``'s copies and their record (after :func:`restore`)."""
    for dest in trained_by(gm).pop(adapter, {}).values():
        owner, _, attr = dest.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)


def adopt_copy(gm: GraphModule, adapter: str) -> None:
    """Make ``adapter``'s copies the modules themselves (what fold leaves), as new objects in place of the
    originals, with the originals' names."""
    for path, dest in trained_by(gm).get(adapter, {}).items():
        owner, _, attr = path.rpartition(".")
        replacement: nn.Module = gm.get_submodule(dest)
        original = gm.get_submodule(path)
        for p, q in zip(replacement.parameters(), original.parameters()):
            p.requires_grad_(q.requires_grad)
        setattr(gm.get_submodule(owner) if owner else gm, attr, replacement)
