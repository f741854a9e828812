"""Rule resolution: which candidate site gets which rule, validated, before anything changes.

Like FX quantization's qconfig resolution, every candidate site of the graph is found first
(:mod:`fxlora.sites`), every rule is resolved against them with a documented precedence (an exact
name beats a pattern, which beats a type; within a tier the rule listed first wins), every selected
site is validated (:mod:`fxlora.ties` included) and given its :class:`~fxlora.lora.SiteSpec`.  The
result is a :class:`Plan`, bound to the graph module it was made for and keyed by node *names*; the
rewrite pass applies it, the report prints it.  A rule that selects nothing, or a site that cannot be
adapted as asked, raises :class:`~fxlora.errors.RuleError` with an explanation before any change.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn
from torch.fx import GraphModule

from .errors import ArgumentError, RuleError
from .lora import DEFAULT_ADAPTER, SiteSpec
from .provenance import BASE, adapters_of, node_info
from .rules import Rule, module_targets, target_matches
from .sites import SUPPORTED, Candidate, find_candidates, try_submodule
from .ties import check_ties

__all__ = [
    "Plan",
    "PlannedSite",
    "make_plan",
    "lora_names",
    "canonical_name",
    "check_adapter_name",
    "resolve_train_modules",
    "resolve_units",
    "train_module_copy",
    "MODULE_TYPES_META",
]

#: ``gm.meta`` key of the model's module types by qualified name, recorded at capture.
MODULE_TYPES_META = "fxlora_module_types"


@dataclass(frozen=True)
class PlannedSite:
    """One site of a plan: its spec, where its branches go, and the rules that chose it."""

    spec: SiteSpec
    calls: tuple[tuple[str, int | str], ...]  # (call node name, where it takes the branch input), one per call
    rule: Rule
    shadowed: tuple[Rule, ...] = ()  # other rules that also matched this site, and lost to ``rule``

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Plan:
    """The resolved rules of one graph module: what :func:`fxlora.rewrite` would do, with nothing done.

    ``graph_module`` is the captured module the plan was made for; ``sites`` are the selected sites in
    graph order; ``candidates`` every site a rule could have selected (their nodes belong to
    ``graph_module``).  :func:`fxlora.rewrite` accepts a plan in place of a model; the rewrite pass
    refuses a graph the plan was not made for.
    """

    graph_module: GraphModule
    sites: tuple[PlannedSite, ...]
    rules: tuple[Rule, ...]
    candidates: tuple[Candidate, ...] = field(repr=False)
    adapter: str = DEFAULT_ADAPTER
    train_modules: tuple[str, ...] = ()  # modules trained in full beside the LoRA factors (PEFT's modules_to_save)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def mismatch(self, gm: GraphModule) -> str | None:
        """Why this plan does not fit ``gm``'s graph (a call it names is missing or different), or None."""
        ours = {n.name: n for n in self.graph_module.graph.nodes}
        theirs = {n.name: n for n in gm.graph.nodes}
        for site in self.sites:
            for call, _ in site.calls:
                mine, other = ours.get(call), theirs.get(call)
                if other is None:
                    return f"node '{call}' of site '{site.name}' is not in the graph"
                if mine is not None and (mine.op, mine.target) != (other.op, other.target):
                    return f"node '{call}' of site '{site.name}' is {other.format_node()} in the graph"
        return None


def check_adapter_name(adapter: object) -> str:
    """``adapter``, or :class:`~fxlora.errors.ArgumentError` when it cannot name an adapter."""
    if not isinstance(adapter, str) or not adapter.isidentifier() or adapter.startswith("_"):
        raise ArgumentError(
            f"an adapter name must be a Python identifier that does not start with '_' (letters, digits and "
            f"underscores, such as 'sst2'), got {adapter!r}: it becomes part of the LoRA parameters' names."
        )
    return adapter


def canonical_name(qualname: str, adapter: str) -> str:
    """The name ``qualname`` (a LoRA parameter or module of ``adapter``) has for the default adapter: what
    a graph rewritten with this adapter alone calls it (``q.lora_A_sst2`` -> ``q.lora_A``)."""
    suffix = "" if adapter == DEFAULT_ADAPTER else f"_{adapter}"
    assert qualname.endswith(suffix), (qualname, adapter)
    return qualname[: len(qualname) - len(suffix)] if suffix else qualname


def lora_names(owner: str, prefix: str, adapter: str) -> tuple[str, str, str]:
    """Qualified names of a site's ``lora_A``, ``lora_B`` and dropout module for ``adapter``.

    The default adapter uses loralib's names (``<module>.lora_A``); another adapter ``name`` appends it
    (``<module>.lora_A_name``).  A functional site on a parameter not called ``weight`` prefixes the
    parameter's name (``w1_lora_A``).
    """
    suffix = "" if adapter == DEFAULT_ADAPTER else f"_{adapter}"

    def qual(attr: str) -> str:
        return f"{owner}.{prefix}{attr}{suffix}" if owner else f"{prefix}{attr}{suffix}"

    return qual("lora_A"), qual("lora_B"), qual("lora_dropout")


def _rule_matches(rule: Rule, cand: Candidate) -> bool:
    if isinstance(rule.target, type):
        return rule.matches_type(cand.module_type)
    return any(rule.matches_name(n) for n in cand.names)


def make_plan(
    gm: GraphModule,
    rules: Sequence[Rule],
    root: nn.Module | None = None,
    *,
    adapter: str = DEFAULT_ADAPTER,
    add_to_existing: bool = False,
    train_modules: Sequence[str | type] = (),
) -> Plan:
    """Resolve ``rules`` against ``gm``'s candidate sites and validate every site; change nothing.

    ``root`` is the module tree ``gm`` was captured from (for names and types; default ``gm``, with the
    types recorded at capture in ``gm.meta["fxlora_module_types"]``).  A graph that already carries
    LoRA branches is refused unless ``add_to_existing`` (:func:`fxlora.add_adapter`), which plans one
    more adapter beside the others.
    """
    types = getattr(gm, "meta", {}).get(MODULE_TYPES_META) if root is None else None
    root = gm if root is None else root
    candidates = find_candidates(gm, root, types)
    if not add_to_existing:
        for cand in candidates:
            if any(node_info(n) is not None for n in cand.nodes):
                raise RuleError(
                    f"'{cand.name}' already carries a LoRA branch (this graph module was made by fxlora.rewrite). "
                    "Add another adapter with fxlora.add_adapter, or fold it first (fxlora.fold) to stack a new "
                    "adapter on the merged weights."
                )
    winners: dict[int, tuple[Rule, int, list[Rule]]] = {}
    for index, rule in enumerate(rules):
        matched_any = False
        for cand in candidates:
            if not cand.kind or not _rule_matches(rule, cand):
                continue
            matched_any = True
            current = winners.get(id(cand))
            if current is None or (rule.tier, index) < (current[0].tier, current[1]):
                lost = [] if current is None else [current[0], *current[2]]
                winners[id(cand)] = (rule, index, lost)
            else:
                current[2].append(rule)
        if not matched_any:
            raise RuleError(explain_unmatched(rule, candidates, root))
    selected = [(c, *winners[id(c)]) for c in candidates if c.kind and id(c) in winners]
    check_ties(gm, [(cand, repr(rule)) for cand, rule, _, _ in selected])
    sites = tuple(
        PlannedSite(
            spec=_make_spec(gm, cand, rule, index, adapter),
            calls=tuple((node.name, where) for node, where in zip(cand.nodes, cand.inputs)),
            rule=rule,
            shadowed=tuple(lost),
        )
        for cand, rule, index, lost in selected
    )
    trained = resolve_train_modules(gm, root, types, train_modules, adapter, [s.name for s in sites])
    return Plan(graph_module=gm, sites=sites, rules=tuple(rules), candidates=tuple(candidates), adapter=adapter,
                train_modules=trained)


def resolve_units(gm: GraphModule, targets: Sequence[str | type]) -> tuple[str, ...]:
    """The module paths that ``targets`` (written like rule targets: ``"model.layers.*"``, a block type)
    select as units of :func:`fxlora.passes.split_units`, outermost first, in graph order."""
    targets = module_targets(targets, "units")
    types = dict(getattr(gm, "meta", {}).get(MODULE_TYPES_META) or {})
    modules = {n: types.get(n, type(m)) for n, m in gm.named_modules() if n}
    chosen: list[str] = []
    for i, target in enumerate(targets):
        hits = [n for n, t in modules.items() if target_matches(target, n, t)]
        if not hits:
            shown = target.__name__ if isinstance(target, type) else repr(target)
            close = difflib.get_close_matches(str(target), list(modules), n=4, cutoff=0.4)
            raise RuleError(f"units[{i}] = {shown} selects no module. Closest names: {', '.join(close) or 'none'}.")
        chosen.extend(h for h in hits if h not in chosen)
    return tuple(p for p in chosen if not any(p.startswith(q + ".") for q in chosen if q != p))


def train_module_copy(path: str, adapter: str) -> str:
    """Where ``adapter``'s own copy of the fully trained module ``path`` is registered."""
    return f"{path}_{adapter}"


def resolve_train_modules(
    gm: GraphModule,
    root: nn.Module,
    types: dict[str, type] | None,
    targets: Sequence[str | type],
    adapter: str,
    site_names: Sequence[str],
) -> tuple[str, ...]:
    """The module paths that ``targets`` (written like rule targets) select to train in full, outermost
    first; each must be read by the graph (not hidden inside an opaque module) and hold no LoRA site."""
    targets = module_targets(targets)
    if not targets:
        return ()
    types = dict(types or {})
    copies = {c for record in (getattr(gm, "meta", {}).get("fxlora") or {}).get("train_modules", {}).values() for c in record.values()}
    modules = {
        n: types.get(n, type(m))
        for n, m in root.named_modules()
        if n and not any(n == c or n.startswith(c + ".") for c in copies)  # other adapters' copies are not the model's
    }
    reads = [  # the model's own reads of modules and attributes (not the LoRA branches')
        n for n in gm.graph.nodes
        if n.op in ("call_module", "get_attr") and (node_info(n) is None or node_info(n)["role"] == BASE)
    ]
    chosen: list[str] = []
    for i, target in enumerate(targets):
        hits = [n for n, t in modules.items() if target_matches(target, n, t)]
        if not hits:
            shown = target.__name__ if isinstance(target, type) else repr(target)
            close = difflib.get_close_matches(str(target), list(modules), n=4, cutoff=0.4)
            raise RuleError(f"train_modules[{i}] = {shown} selects no module. Closest names: {', '.join(close) or 'none'}.")
        chosen.extend(h for h in hits if h not in chosen)
    outermost = [p for p in chosen if not any(p.startswith(q + ".") for q in chosen if q != p)]
    sites = list(site_names) + [s for specs in adapters_of(gm).values() for s in specs]
    targets_read = [(n, n.meta.get("fxlora_train", n.target)) for n in reads]  # as the model reads them
    for path in outermost:
        under = [n for n, t in targets_read if isinstance(t, str) and (t == path or t.startswith(path + "."))]
        opaque = [n for n, t in targets_read if n.op == "call_module" and path.startswith(t + ".")]
        if opaque:
            raise RuleError(
                f"train module '{path}' runs inside module '{opaque[0].target}', which the graph calls as a whole; "
                f"train '{opaque[0].target}' instead, or capture it without keeping it opaque (leaf_modules)."
            )
        if not under:
            raise RuleError(f"train module '{path}' is never read by the captured graph (unused, or not a module of it).")
        inside = [s for s in sites if s == path or s.startswith(path + ".")]
        if inside:
            raise RuleError(
                f"train module '{path}' contains the LoRA site '{inside[0]}'; a module is either trained in full or "
                "given a low-rank update, not both. Leave one of them out."
            )
        copy = train_module_copy(path, adapter)
        if try_submodule(gm, copy) is not None:
            raise RuleError(f"train module '{path}': '{copy}' already exists in the module; choose another adapter name.")
    return tuple(outermost)


def explain_unmatched(rule: Rule, candidates: Sequence[Candidate], root: nn.Module) -> str:
    """Why ``rule`` selects no site, with the names or types the user may have meant."""
    module_names = [n for n, _ in root.named_modules(remove_duplicate=False) if n]
    called = {n for c in candidates for n in c.names}
    site_names = [c.name for c in candidates if c.kind]
    if isinstance(rule.target, type):
        types = {n: type(m) for n, m in root.named_modules() if n}
        hits = [n for n, t in types.items() if issubclass(t, rule.target)]
        if hits:
            return (
                f"{rule!r} selects no site: modules of type {rule.target.__name__} exist ({', '.join(hits[:5])}) "
                f"but none is called in the traced graph (they run inside a leaf module, or are unused). "
                f"Sites fxlora can adapt here: {', '.join(site_names[:8]) or 'none'}."
            )
        present = sorted({type(m).__name__ for _, m in root.named_modules()})
        return (
            f"{rule!r} selects no site: the model has no {rule.target.__name__}. Module types present: "
            f"{', '.join(present[:12])}."
        )
    matched = [n for n in module_names if rule.matches_name(n)]
    if matched:
        lines = []
        for n in matched[:5]:
            cand = next((c for c in candidates if n in c.names), None)
            if cand is not None and cand.reason:
                lines.append(f"'{n}' ({cand.reason})")
            elif n not in called:
                mod = root.get_submodule(n)
                if list(mod.children()):
                    child_sites = [s for s in site_names if s.startswith(n + ".")][:4]
                    hint = f"; its sites are {', '.join(child_sites)}" if child_sites else ""
                    lines.append(f"'{n}' ({type(mod).__name__} is a container, not a site{hint})")
                else:
                    lines.append(
                        f"'{n}' ({type(mod).__name__} is never called as a module in the traced graph: it is "
                        "unused or runs inside a leaf module)"
                    )
        return f"{rule!r} matched only modules fxlora cannot adapt: " + "; ".join(lines) + f". fxlora adapts {SUPPORTED}."
    text = rule.target[3:] if rule.target.startswith("re:") else rule.target  # type: ignore[union-attr]
    pool = list(dict.fromkeys(site_names + module_names))
    close = difflib.get_close_matches(text, pool, n=5, cutoff=0.4)
    if not close:
        close = pool[:5]
    return f"{rule!r} matched no module or site. Closest qualified names: {', '.join(close) or '(the model has none)'}."


def _make_spec(gm: GraphModule, cand: Candidate, rule: Rule, rule_index: int, adapter: str) -> SiteSpec:
    def fail(why: str) -> RuleError:
        return RuleError(f"{rule!r} selects '{cand.name}' ({cand.type_name}), but {why}")

    shape = cand.weight_shape
    kind = cand.kind
    fan = False
    if kind == "linear":
        if cand.layout_from_graph is not None:
            fan = cand.layout_from_graph
            if rule.fan_in_fan_out is not None and rule.fan_in_fan_out != fan:
                how = "x @ W (weight stored (in, out))" if fan else "F.linear(x, W) (weight stored (out, in))"
                raise fail(
                    f"the graph computes {how}, which contradicts fan_in_fan_out={rule.fan_in_fan_out}. "
                    "Drop fan_in_fan_out from the rule: fxlora reads the layout from the graph."
                )
        elif cand.custom_leaf:
            fan = bool(rule.fan_in_fan_out)
        elif rule.fan_in_fan_out:
            raise fail(
                "nn.Linear always stores its weight as (out, in); fan_in_fan_out=True is for modules that compute "
                "x @ W + b with W stored (in, out), such as GPT-2's Conv1D. Drop fan_in_fan_out from the rule."
            )
        out_f, in_f = (shape[1], shape[0]) if fan else (shape[0], shape[1])
    elif kind == "embedding":
        in_f, out_f = shape
    else:
        out_f, in_f = shape[0], shape[1] * cand.op["groups"]
    if rule.enable_lora is not None:
        if kind != "linear":
            raise fail("enable_lora applies only to linear (fused projection) sites. Use a separate rule for it.")
        if out_f % len(rule.enable_lora) != 0:
            raise fail(
                f"enable_lora has {len(rule.enable_lora)} entries, which does not divide its {out_f} output "
                f"features. Give one entry per equal slice of the fused output (e.g. 3 for q, k, v)."
            )
    if rule.fan_in_fan_out is not None and kind != "linear":
        raise fail("fan_in_fan_out applies only to linear sites.")
    if kind == "conv" and rule.r % cand.op["groups"] != 0:
        raise fail(
            f"it is a grouped convolution (groups={cand.op['groups']}) and r={rule.r} is not divisible by the "
            "number of groups; each group gets rank r / groups. Choose r as a multiple of groups."
        )
    lora_A, lora_B, dropout_module = lora_names(cand.owner, cand.prefix, adapter)
    owner_mod = try_submodule(gm, cand.owner)
    for qualname in (lora_A, lora_B, dropout_module):
        attr = qualname.rpartition(".")[2]
        if owner_mod is not None and hasattr(owner_mod, attr):
            raise fail(
                f"'{cand.owner or '<root>'}' already has an attribute '{attr}' (a LoRA layer from another "
                "library?). Apply fxlora to the plain base model."
            )
    dropout = rule.dropout if kind != "embedding" else 0.0
    return SiteSpec(
        name=cand.name,
        kind=kind,  # type: ignore[arg-type]
        weight=cand.weight,
        bias=cand.bias,
        lora_A=lora_A,
        lora_B=lora_B,
        dropout_module=dropout_module if dropout > 0 else None,
        weight_shape=shape,
        in_features=in_f,
        out_features=out_f,
        r=rule.r,
        alpha=rule.alpha,
        dropout=dropout,
        rule=repr(rule),
        rule_index=rule_index,
        rule_target=rule.target_text,
        enable_lora=rule.enable_lora,
        fan_in_fan_out=fan,
        op=dict(cand.op),
        adapter=adapter,
    )
