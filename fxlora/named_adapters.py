"""Several adapters on one base: add, switch, delete, disable, unload.

A module made by :func:`fxlora.rewrite` holds one adapter, ``"default"`` unless named otherwise;
:func:`add_adapter` adds more, each with its own rules (sites, r, alpha, dropout, ``enable_lora``),
sharing the base weights.  Every adapter's parameters are registered on the module (the default
adapter's as ``<site>.lora_A`` / ``<site>.lora_B``, loralib's names; another adapter ``name``'s as
``<site>.lora_A_name`` / ``<site>.lora_B_name``), but the graph holds the branches of the *active*
adapters only (see ``fxlora.passes.SetActiveAdapters``): an inactive adapter costs no compute.

* :func:`adapters` / :func:`active_adapters` list them; :func:`set_adapter` chooses which run (several
  at once add up; ``None`` runs the base model); :func:`disable_adapter` runs the base model inside a
  ``with`` block (reference passes for DPO) and restores what was active.
* :func:`delete_adapter` removes one (not the last: :func:`unload` gives back the base model);
  :func:`unload` returns the base graph with every adapter removed and the weights unchanged.
* ``fxlora.fold(gm, adapters={"a": 1.0, "b": 0.5})`` folds a weighted sum of adapters.

Switching regenerates the module's code from its graph (a few milliseconds); it never re-captures the
model and never touches a base weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch.fx import GraphModule

from .errors import ArgumentError
from .passes import FoldPass, RemoveAdapter, RewritePass, SetActiveAdapters, unit_paths
from .provenance import active_adapters as _active, adapter_state, adapters_of, require_sites, require_unserved
from .resolution import check_adapter_name, make_plan
from .rules import Rule, as_rules
from .state import mark_only_lora_as_trainable
from .tracing import copy_graph_module

__all__ = [
    "adapters",
    "active_adapters",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "unload",
    "train_modules_of",
    "check_train_module_conflicts",
    "check_not_split",
]


def active_adapters(gm: GraphModule) -> list[str]:
    """The names of the adapters whose branches run, in creation order (empty under
    :func:`disable_adapter` or after ``set_adapter(gm, None)``)."""
    return _active(require_sites(gm, "active_adapters") and gm)


def adapters(gm: GraphModule) -> list[str]:
    """The names of ``gm``'s adapters, in the order they were added."""
    return list(require_sites(gm, "adapters") and adapters_of(gm))


def _known(gm: GraphModule, name: object, what: str) -> str:
    known = adapters_of(gm)
    if not isinstance(name, str) or name not in known:
        raise ArgumentError(f"{what}: no adapter named {name!r}; this module has {', '.join(map(repr, known))}.")
    return name


def add_adapter(
    gm: GraphModule, rules: Rule | Sequence[Rule], name: str, *, train_modules: Sequence[str | type] | None = None
) -> None:
    """Add adapter ``name`` with its own ``rules`` to ``gm`` (a module made by :func:`fxlora.rewrite`), in
    place.  Its sites are found on ``gm``'s graph with the same rule semantics as ``rewrite``; sites that
    other adapters already adapt get a second pair of factors, the base weights stay shared.  Like PEFT's
    ``add_adapter``, the new adapter is *inactive* (no branch in the graph, parameters frozen) until
    :func:`set_adapter` selects it.  ``train_modules`` are modules the adapter trains in full, as for
    :func:`fxlora.rewrite`.
    """
    require_unserved(gm, "add_adapter")
    check_not_split(gm, "add_adapter")
    check_adapter_name(name)
    if name in adapters_of(gm):
        raise ArgumentError(
            f"add_adapter: this module already has an adapter named {name!r}; choose another name or delete it first "
            "(fxlora.delete_adapter)."
        )
    plan = make_plan(gm, as_rules(rules), None, adapter=name, add_to_existing=True, train_modules=train_modules or ())
    RewritePass(plan, activate=False)(gm)
    _after_change(gm)


def set_adapter(gm: GraphModule, names: str | Sequence[str] | None) -> None:
    """Run the adapters ``names`` (one name, a list whose updates add up, or None for the base model
    alone), in place.  The active adapters' LoRA parameters train (with the bias mode last given to
    :func:`fxlora.mark_only_lora_as_trainable`), the others are frozen."""
    require_unserved(gm, "set_adapter")
    check_not_split(gm, "set_adapter")
    if names is None:
        wanted: list[str] = []
    elif isinstance(names, str):
        wanted = [names]
    elif isinstance(names, Sequence):
        wanted = list(names)
    else:
        raise ArgumentError(f"set_adapter takes an adapter name, a list of names or None, got {type(names).__name__}.")
    for name in wanted:
        _known(gm, name, "set_adapter")
    if len(set(wanted)) != len(wanted):
        raise ArgumentError(f"set_adapter: an adapter is named twice in {wanted}.")
    check_train_module_conflicts(gm, wanted, "set_adapter")
    SetActiveAdapters(wanted)(gm)
    _after_change(gm)


def delete_adapter(gm: GraphModule, name: str) -> None:
    """Remove adapter ``name`` (its branches if active, its parameters and records), in place.  The last
    adapter cannot be deleted: :func:`unload` gives back the base model."""
    require_unserved(gm, "delete_adapter")
    check_not_split(gm, "delete_adapter")
    _known(gm, name, "delete_adapter")
    if len(adapters_of(gm)) == 1:
        raise ArgumentError(
            f"delete_adapter: {name!r} is this module's only adapter; fxlora.unload(gm) gives back the base model."
        )
    RemoveAdapter(name)(gm)
    _after_change(gm)


@contextlib.contextmanager
def disable_adapter(gm: GraphModule) -> Iterator[GraphModule]:
    """``with fxlora.disable_adapter(gm): ...`` runs the base model (no adapter active) inside the block,
    and restores the adapters that were active, also when the block raises."""
    active = _active(require_unserved(gm, "disable_adapter") and gm)
    set_adapter(gm, None)
    try:
        yield gm
    finally:
        set_adapter(gm, active)


def unload(gm: GraphModule) -> GraphModule:
    """A new plain ``GraphModule``: the base graph with every adapter removed and the base weights as they
    are (nothing folded).  ``gm`` is not modified."""
    require_unserved(gm, "unload")
    out = copy_graph_module(gm)
    FoldPass(weights={})(out)
    return out


def check_not_split(gm: GraphModule, what: str) -> None:
    """Adapters are chosen on the flat graph: a module split into units (``rewrite(..., units=...)``) is
    trained, saved and folded, not switched."""
    if unit_paths(gm):
        raise ArgumentError(
            f"{what}: this module is split into units ({', '.join(unit_paths(gm)[:3])}...); add, switch and combine "
            "adapters before splitting: rewrite without units=, choose the adapters, then fxlora.passes.split_units."
        )


def check_train_module_conflicts(gm: GraphModule, names: Sequence[str], what: str) -> None:
    """Two adapters that train the same module in full cannot run (or fold) together."""
    owner: dict[str, str] = {}
    for name in names:
        for path in train_modules_of(gm).get(name, {}):
            if path in owner:
                raise ArgumentError(
                    f"{what}: adapters {owner[path]!r} and {name!r} both train module '{path}' in full; only one of them "
                    "can be used at a time."
                )
            owner[path] = name


def train_modules_of(gm: GraphModule) -> dict[str, dict[str, str]]:
    """adapter -> {module trained in full -> the adapter's copy of it}."""
    return dict(adapter_state(gm).get("train_modules", {}))


def _after_change(gm: GraphModule) -> None:
    """What follows any change of a module's adapters: trainable flags for the active ones, and a new
    version number (so that a cached fold, see ``merge_on_eval``, is rebuilt)."""
    state = adapter_state(gm)
    state["version"] = state.get("version", 0) + 1
    mark_only_lora_as_trainable(gm, state.get("bias", "none"))
