"""What fxlora records in a graph module, and the one way to read it.

Two records, both written by the rewrite pass and read by every other part of fxlora:

* on the graph module, ``gm.meta["fxlora"]``: the adapters and their sites (:class:`SiteSpec` by site
  name, per adapter) and which adapters are active.  This is the state that says "this module was made
  by fxlora.rewrite";
* on every node the rewrite pass creates or adapts, ``node.meta["fxlora"] = {"site", "adapter",
  "role", "spec"}``, with ``role`` one of :data:`ROLES`, so that passes find the nodes they act on by
  role instead of pattern-matching the shape of the LoRA math.

:func:`require_sites` is the single place that raises :class:`~fxlora.errors.NotRewrittenError`.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule, Node

from .errors import ArgumentError, NotRewrittenError
from .lora import SiteSpec

__all__ = [
    "META_KEY",
    "ROLES",
    "BASE",
    "LORA_A",
    "LORA_B",
    "DROPOUT",
    "SHRINK",
    "EXPAND",
    "ADD",
    "MIXED",
    "tag",
    "tag_base",
    "node_info",
    "record_site",
    "adapter_state",
    "forget_sites",
    "adapters_of",
    "active_adapters",
    "graph_sites",
    "is_rewritten",
    "require_sites",
    "require_unserved",
]

#: The key under which fxlora records provenance, in ``node.meta`` and in ``gm.meta``.
META_KEY = "fxlora"

# Node roles.
BASE = "base"  # the site's own call (F.linear, call_module...): kept by fold
LORA_A = "lora_A"  # get_attr of the A factor
LORA_B = "lora_B"  # get_attr of the B factor
DROPOUT = "dropout"  # the branch's dropout module call
SHRINK = "shrink"  # the rank-r projection A(x): what sibling fusion shares
EXPAND = "expand"  # B(h) * scale and whatever the kind needs to build it
ADD = "add"  # base output + branch output: the node users of the site read
MIXED = "mixed"  # a served module's mixed-batch branch (one adapter per sample; see fxlora.serve)
ROLES = (BASE, LORA_A, LORA_B, DROPOUT, SHRINK, EXPAND, ADD, MIXED)


def tag(node: Node, spec: SiteSpec, role: str) -> None:
    """Record that ``node`` plays ``role`` in ``spec``'s branch."""
    assert role in ROLES and role != BASE, role
    node.meta[META_KEY] = {"site": spec.name, "adapter": spec.adapter, "role": role, "spec": spec}


def tag_base(node: Node, site: str, where: int | str) -> None:
    """Record that ``node`` is a call of ``site`` (shared by every adapter of the site), taking the
    branch input at ``where`` (an index into ``node.args`` or a keyword)."""
    node.meta[META_KEY] = {"site": site, "adapter": None, "role": BASE, "input": where}


def node_info(node: Node) -> dict[str, Any] | None:
    """``node.meta["fxlora"]``, or None for a node fxlora did not create or adapt."""
    return node.meta.get(META_KEY)


def _state(gm: GraphModule, create: bool = False) -> dict[str, Any] | None:
    meta = getattr(gm, "meta", None)
    if meta is None:
        if not create:
            return None
        gm.meta = meta = {}
    state = meta.get(META_KEY)
    if state is None and create:
        state = meta[META_KEY] = {"adapters": {}, "active": []}
    return state


def record_site(gm: GraphModule, spec: SiteSpec, active: bool = True) -> None:
    """Register ``spec`` on ``gm``; a new adapter joins the active ones when its branches are in the graph
    (``active``)."""
    state = adapter_state(gm)
    if spec.adapter not in state["adapters"]:
        state["adapters"][spec.adapter] = {}
        if active:
            state["active"].append(spec.adapter)
    state["adapters"][spec.adapter][spec.name] = spec


def adapter_state(gm: GraphModule) -> dict[str, Any]:
    """``gm.meta["fxlora"]``, created empty when missing: ``{"adapters": {name: {site: SiteSpec}}, "active":
    [names], ...}``, the one mutable record of which adapters a graph module holds and runs."""
    state = _state(gm, create=True)
    assert state is not None
    return state


def forget_sites(gm: GraphModule) -> None:
    """Drop every record from ``gm`` (what fold leaves: a plain graph module)."""
    meta = getattr(gm, "meta", None)
    if meta is not None:
        meta.pop(META_KEY, None)


def adapters_of(gm: Any) -> dict[str, dict[str, SiteSpec]]:
    """Adapter name -> {site name -> SiteSpec}, in creation order ({} for a module fxlora did not make).

    A graph module whose ``meta`` was lost (rebuilt by hand as ``GraphModule(gm, gm.graph)``) is read
    back from its nodes' records.
    """
    if not isinstance(gm, GraphModule):
        return {}
    state = _state(gm)
    if state is not None:
        return state["adapters"]
    found: dict[str, dict[str, SiteSpec]] = {}
    for node in gm.graph.nodes:
        info = node_info(node)
        if info is not None and info["role"] != BASE:
            found.setdefault(info["adapter"], {}).setdefault(info["site"], info["spec"])
    return found


def active_adapters(gm: Any) -> list[str]:
    """The names of the adapters whose branches run, in creation order."""
    state = _state(gm) if isinstance(gm, GraphModule) else None
    return list(state["active"]) if state is not None else list(adapters_of(gm))


def graph_sites(gm: Any, adapter: str | None = None) -> dict[str, SiteSpec]:
    """The LoRA sites of ``adapter`` (default: of every adapter, the first one's spec for a site that
    several adapters share), by site name, in graph order.  Empty for a module fxlora did not make."""
    adapters = adapters_of(gm)
    if adapter is not None:
        return dict(adapters.get(adapter, {}))
    sites: dict[str, SiteSpec] = {}
    for specs in adapters.values():
        for name, spec in specs.items():
            sites.setdefault(name, spec)
    return sites


def is_rewritten(gm: Any) -> bool:
    return bool(graph_sites(gm))


def require_unserved(gm: Any, what: str) -> dict[str, SiteSpec]:
    """:func:`require_sites`, and an :class:`ArgumentError` for a served module (:func:`fxlora.serve`),
    whose factors are stacked for mixed batches: switching, adding, folding or reporting its adapters is
    done on the module it was served from."""
    sites = require_sites(gm, what)
    state = _state(gm) if isinstance(gm, GraphModule) else None
    if state is not None and "served" in state:
        raise ArgumentError(
            f"{what} does not work on a served module (fxlora.serve), which holds its adapters' factors stacked "
            f"for mixed batches: call {what} on the module you served from, then serve it again. A served module "
            "loads and saves each adapter (load_lora / save_lora / lora_state_dict with adapter=...)."
        )
    return sites


def require_sites(gm: Any, what: str) -> dict[str, SiteSpec]:
    """``graph_sites(gm)``, or :class:`NotRewrittenError` when ``gm`` is not a module fxlora rewrote (the
    one place that error is raised)."""
    sites = graph_sites(gm)
    if not sites:
        raise NotRewrittenError(
            f"{what} expects the graph module returned by fxlora.rewrite; this {type(gm).__name__} has no LoRA "
            "sites."
        )
    return sites
