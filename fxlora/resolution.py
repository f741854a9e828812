"""Rule resolution: which candidate site gets which rule, validated, before anything changes.

Like FX quantization's qconfig resolution, every candidate site of the graph is found first
(:mod:`fxlora.sites`), every rule is resolved against them with a documented precedence (an exact
name beats a pattern, which beats a type; within a tier the rule listed first wins), every selected
site is validated (:mod:`fxlora.ties` included: a rule that selects one use of a tied weight adapts the weight
at every use, or is refused with ``tied="refuse"``) and given its :class:`~fxlora.lora.SiteSpec`.  The
result is a :class:`Plan`, bound to the graph module it was made for and keyed by node *names*; the
rewrite pass applies it, the report prints it.  A rule that selects nothing, or a site that cannot be
adapted as asked, raises :class:`~fxlora.errors.RuleError` with an explanation before any change.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn
from torch.fx import GraphModule

from .errors import ArgumentError, RuleError
from .lora import DEFAULT_ADAPTER, SiteSpec
from .provenance import BASE, adapters_of, node_info
from .quantized import is_quantized
from .rules import Rule, module_targets, target_matches
from .sites import SUPPORTED, Candidate, find_candidates, modules_unchanged, op_name, try_submodule
from .ties import check_tied_mode, tie_groups, weight_uses

__all__ = [
    "Plan",
    "PlannedSite",
    "make_plan",
    "warn_unreached",
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

logger = logging.getLogger("fxlora")


@dataclass(frozen=True)
class PlannedSite:
    """One site of a plan: its spec, where its branches go, and the rules that chose it."""

    spec: SiteSpec
    calls: tuple[tuple[str, int | str | tuple[int, int]], ...]  # (call node name, where it takes the branch input), one per call
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
    #: modules a rule names that are not sites (module name, why): every module of a type rule's type, and
    #: the Linear/Embedding/Conv modules a name rule names inside a leaf the symbolic graph keeps opaque
    #: (logged as a warning by fxlora.plan and fxlora.rewrite)
    unreached: tuple[tuple[str, str], ...] = ()
    #: some of them run inside a module that symbolic tracing kept opaque (a torch.export capture sees them)
    opaque: bool = False
    train_modules: tuple[str, ...] = ()  # modules trained in full beside the LoRA factors (PEFT's modules_to_save)

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self):
        return iter(self.sites)

    def mismatch(self, gm: GraphModule) -> str | None:
        """Why this plan does not fit ``gm``'s graph (a call it names is missing or different), or None."""
        ours = {n.name: n for n in self.graph_module.graph.nodes}
        theirs = ours if gm.graph is self.graph_module.graph else {n.name: n for n in gm.graph.nodes}
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
    tied: str = "adapt",
    train_modules: Sequence[str | type] = (),
) -> Plan:
    """Resolve ``rules`` against ``gm``'s candidate sites and validate every site; change nothing.

    ``root`` is the module tree ``gm`` was captured from (for names; default ``gm``); the model's own
    module types come from ``gm.meta["fxlora_module_types"]``, recorded at capture, so type rules work
    on a graph module captured earlier.  A graph that already carries LoRA branches is refused unless
    ``add_to_existing`` (:func:`fxlora.add_adapter`), which plans one more adapter beside the others.
    ``tied`` says what a rule that selects a use of a tied weight does (:mod:`fxlora.ties`): ``"adapt"``
    the weight at every use with one pair, or ``"refuse"``.
    """
    check_tied_mode(tied)
    with modules_unchanged():  # planning changes nothing
        return _make_plan(gm, rules, root, adapter=adapter, add_to_existing=add_to_existing, tied=tied, train_modules=train_modules)


def _make_plan(
    gm: GraphModule,
    rules: Sequence[Rule],
    root: nn.Module | None,
    *,
    adapter: str,
    add_to_existing: bool,
    tied: str,
    train_modules: Sequence[str | type],
) -> Plan:
    types = getattr(gm, "meta", {}).get(MODULE_TYPES_META)
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
            raise RuleError(explain_unmatched(rule, candidates, root, gm, types))
    selected = [c for c in candidates if c.kind and id(c) in winners]
    groups = tie_groups(gm, candidates, [(c, repr(winners[id(c)][0])) for c in selected], tied)
    sites = []
    for group in groups:
        chosen = [winners[id(c)] for c in group if id(c) in winners]
        rule, index, _ = min(chosen, key=lambda w: (w[0].tier, w[1]))
        lost = [r for w in chosen for r in (w[0], *w[2]) if r is not rule]
        nodes = [(node, where) for c in group for node, where in zip(c.nodes, c.inputs)]
        if len(group) > 1:
            order = {n: i for i, n in enumerate(gm.graph.nodes)}
            nodes.sort(key=lambda pair: order[pair[0]])
            spec = _make_tied_spec(gm, group, rule, index, adapter)
        else:
            spec = _make_spec(gm, group[0], rule, index, adapter)
        sites.append(
            PlannedSite(
                spec=spec,
                calls=tuple((node.name, where) for node, where in nodes),
                rule=rule,
                shadowed=tuple(dict.fromkeys(lost)),
            )
        )
    unreached, opaque = _unreached(gm, rules, candidates, root, types)
    trained = resolve_train_modules(gm, root, types, train_modules, adapter, [s.spec.name for s in sites])
    return Plan(
        graph_module=gm, sites=tuple(sites), rules=tuple(rules), candidates=tuple(candidates), adapter=adapter,
        unreached=tuple((n, why) for n, why, _ in unreached), opaque=opaque, train_modules=trained,
    )


def resolve_units(gm: GraphModule, targets: Sequence[str | type]) -> tuple[str, ...]:
    """The module paths that ``targets`` (written like rule targets: ``"model.layers.*"``, a block type)
    select as units of :func:`fxlora.passes.split_units`, outermost first, in graph order."""
    targets = module_targets(targets, "units")
    types = dict(getattr(gm, "meta", {}).get(MODULE_TYPES_META) or {})
    modules = {n: types.get(n, type(m)) for n, m in gm.named_modules() if n}
    return tuple(_outermost_selected(targets, modules, "units"))


def _outermost_selected(targets: Sequence[str | type], modules: dict[str, type], what: str) -> list[str]:
    """The paths of ``modules`` (path -> type) that ``targets`` select, outermost first, in order; a
    target that selects none is a RuleError naming ``what[i]`` and the closest names."""
    chosen: list[str] = []
    for i, target in enumerate(targets):
        hits = [n for n, t in modules.items() if target_matches(target, n, t)]
        if not hits:
            shown = target.__name__ if isinstance(target, type) else repr(target)
            close = difflib.get_close_matches(str(target), list(modules), n=4, cutoff=0.4)
            raise RuleError(f"{what}[{i}] = {shown} selects no module. Closest names: {', '.join(close) or 'none'}.")
        chosen.extend(h for h in hits if h not in chosen)
    return [p for p in chosen if not any(p.startswith(q + ".") for q in chosen if q != p)]


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
    outermost = _outermost_selected(targets, modules, "train_modules")
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


def warn_unreached(plan: Plan) -> None:
    """Log (``logging.getLogger("fxlora")``, warning) the modules that the plan's rules name but could not
    select (:attr:`Plan.unreached`), so that a rule never skips a module silently."""
    if not plan.unreached:
        return
    names = ", ".join(n for n, _ in plan.unreached[:6]) + (" ..." if len(plan.unreached) > 6 else "")
    logger.warning(
        "the rules select %d site(s) but not these %d modules they name: %s. Why, for the first: %s",
        len(plan.sites), len(plan.unreached), names, plan.unreached[0][1],
    )


_ADAPTABLE_MODULES = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)


def _unreached(
    gm: GraphModule, rules: Sequence[Rule], candidates: Sequence[Candidate], root: nn.Module, types: dict[str, type] | None
) -> tuple[list[tuple[str, str, Rule]], bool]:
    """Modules with parameters that a rule names but no candidate covers: ``(name, why, rule)``, and
    whether some of them sit inside a module the symbolic graph keeps opaque.  A type rule reports every
    such module of its type; a name rule, the Linear / Embedding / Conv modules it names inside an opaque
    leaf (a broad glob also names LayerNorms and containers, which are not sites anywhere)."""
    if not rules:
        return [], False
    types = dict(types) if types else {n: type(m) for n, m in root.named_modules() if n}
    covered = {n for c in candidates for n in c.names} | {c.owner for c in candidates if c.owner}
    facts = _GraphFacts(gm)
    site_names = [c.name for c in candidates if c.kind]
    found, opaque = [], False
    for rule in rules:
        by_type = isinstance(rule.target, type)
        for name, t in types.items():
            if name in covered or not (rule.matches_type(t) if by_type else rule.matches_name(name)):
                continue
            leaf = None if facts.export else facts.leaf_holding(name)
            if not by_type and (leaf is None or not issubclass(t, _ADAPTABLE_MODULES)):
                continue
            mod = try_submodule(root, name)
            if mod is not None and not any(True for _ in mod.parameters(recurse=False)):
                continue
            if any(s.startswith(name + ".") for s in site_names):
                continue
            found.append((name, _why_not_a_site(name, root, candidates, facts, site_names), rule))
            opaque |= leaf is not None
    return found, opaque


def _is_export_graph(gm: GraphModule) -> bool:
    capture = getattr(gm, "meta", {}).get("fxlora_capture")
    if capture is not None and capture != "graph_module":
        return capture == "torch.export"
    return any("nn_module_stack" in n.meta for n in gm.graph.nodes)


class _GraphFacts:
    """What explain_unmatched reads from a graph, computed once: which ops read each module's parameters,
    and which modules are opaque leaves."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.export = _is_export_graph(gm)
        self.leaves = sorted({n.target for n in gm.graph.nodes if n.op == "call_module"}, key=len, reverse=True)
        self._uses = None

    def ran(self, name: str) -> bool:
        """Whether module ``name`` ran while the graph was captured (some node records it in its
        ``nn_module_stack``, or calls it)."""
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and node.target == name:
                return True
            stack = node.meta.get("nn_module_stack") or {}
            if any(isinstance(entry, tuple) and entry and entry[0] == name for entry in stack.values()):
                return True
        return False

    def leaf_holding(self, name: str) -> str | None:
        """The call_module leaf that ``name`` (a module or parameter path) is inside of, if any."""
        return next((t for t in self.leaves if name == t or name.startswith(t + ".")), None)

    def ops_reading(self, prefix: str) -> list[str]:
        """Readable descriptions of the ops that read parameter ``prefix``, or the parameters a module
        ``prefix`` holds itself."""
        if self._uses is None:
            self._uses = weight_uses(self.gm)
        found: dict[str, list[str]] = {}
        for pname, p in self.gm.named_parameters(remove_duplicate=False):
            if not (pname == prefix or pname.rpartition(".")[0] == prefix):
                continue
            key = ("param", id(p))
            if key not in self._uses:
                continue
            for node in self._uses.neighbors(key):
                what = f"module '{node.target}'" if node.op == "call_module" else op_name(node.target)
                found.setdefault(what, []).append(pname.rpartition(".")[2])
        return [f"{what} (on {', '.join(dict.fromkeys(params))})" for what, params in found.items()]


def _export_hint() -> str:
    return (
        "pass example_inputs=(...) (and example_kwargs={...}) so that fxlora captures the model with torch.export "
        "and sees the ops inside it (capture='auto' does this by itself when example inputs are given), or "
        "capture='export'"
    )


def _why_not_a_site(name: str, root: nn.Module, candidates: Sequence[Candidate], facts: _GraphFacts, site_names: list[str]) -> str:
    """Why module ``name`` is not a site, in terms of the graph that was captured."""
    cand = next((c for c in candidates if name in c.names), None)
    mod = try_submodule(root, name)
    type_name = type(mod).__name__ if mod is not None else "module"
    if cand is not None and cand.reason:
        return f"'{name}' ({cand.reason})"
    child_sites = [s for s in site_names if s.startswith(name + ".")][:4]
    own_params = mod is not None and any(True for _ in mod.parameters(recurse=False))
    if child_sites:
        what = "is not a site itself" if own_params else "is a container, not a site"
        return f"'{name}' ({type_name} {what}; its sites are {', '.join(child_sites)})"
    if mod is not None and list(mod.children()) and not own_params:
        leaf = facts.leaf_holding(name)
        hint = ""
        if leaf is not None and not facts.export:
            hint = f"; it runs inside '{leaf}', which symbolic tracing keeps opaque: {_export_hint()}"
        return f"'{name}' ({type_name} is a container, not a site{hint})"
    if facts.export:
        reads = facts.ops_reading(name)
        quantized = [n for n, p in (mod.named_parameters(recurse=False) if mod is not None else ()) if is_quantized(p)]
        if quantized:
            return (
                f"'{name}' ({type_name}: its {quantized[0]} is a quantized {type(getattr(mod, quantized[0])).__name__}, "
                "which torch.export flattens into its inner tensors; fxlora adapts quantized weights in symbolically "
                "traced graphs: capture='symbolic')"
            )
        if reads:
            return (
                f"'{name}' ({type_name}: in the torch.export graph its weights are read by {'; '.join(reads[:3])}, "
                "which fxlora does not adapt)"
            )
        return f"'{name}' ({type_name}: no op of the torch.export graph reads its weights; it is unused for these inputs)"
    leaf = facts.leaf_holding(name)
    if leaf is not None:
        held = try_submodule(root, leaf)
        return (
            f"'{name}' ({type_name} runs inside '{leaf}' ({type(held).__name__}), which symbolic tracing keeps "
            f"opaque as a leaf module: {_export_hint()})"
        )
    reads = facts.ops_reading(name)
    if reads:
        return f"'{name}' ({type_name}: in the traced graph its weights are read by {'; '.join(reads[:3])}, which fxlora does not adapt)"
    if facts.ran(name):
        return f"'{name}' ({type_name} is called in the traced graph, but no op there reads its weights)"
    return f"'{name}' ({type_name} is never called in the traced graph: the model does not use it for these inputs)"


def explain_unmatched(
    rule: Rule,
    candidates: Sequence[Candidate],
    root: nn.Module,
    gm: GraphModule | None = None,
    module_types: dict[str, type] | None = None,
) -> str:
    """Why ``rule`` selects no site, in terms of the captured graph, with the names or types the user may
    have meant."""
    gm = root if gm is None or not isinstance(gm, GraphModule) else gm
    facts = _GraphFacts(gm) if isinstance(gm, GraphModule) else None
    module_names = [n for n, _ in root.named_modules(remove_duplicate=False) if n]
    site_names = [c.name for c in candidates if c.kind]
    types = dict(module_types) if module_types else {n: type(m) for n, m in root.named_modules() if n}
    if isinstance(rule.target, type):
        hits = [n for n, t in types.items() if issubclass(t, rule.target)]
        if not hits:
            present = sorted({t.__name__ for t in types.values()})
            return (
                f"{rule!r} selects no site: the model has no {rule.target.__name__}. Module types present: "
                f"{', '.join(present[:12])}."
            )
        called = [c for c in candidates if rule.matches_type(c.module_type) and c.reason]
        if called:
            lines = "; ".join(f"'{c.name}' ({c.reason})" for c in called[:4])
            return (
                f"{rule!r} selects no site: the {rule.target.__name__} modules are called, but fxlora cannot adapt "
                f"them: {lines}. fxlora adapts {SUPPORTED}."
            )
        lines = "; ".join(_why_not_a_site(n, root, candidates, facts, site_names) for n in hits[:4]) if facts else ""
        return (
            f"{rule!r} selects no site: modules of type {rule.target.__name__} exist ({', '.join(hits[:5])}) but "
            f"none is a site: {lines}. Sites fxlora can adapt here: {', '.join(site_names[:8]) or 'none'}."
        )
    matched = [n for n in module_names if rule.matches_name(n)]
    if matched and facts is not None:
        lines = [_why_not_a_site(n, root, candidates, facts, site_names) for n in matched[:5]]
        return f"{rule!r} matched only modules fxlora cannot adapt: " + "; ".join(lines) + f". fxlora adapts {SUPPORTED}."
    reasoned = [c for c in candidates if not c.kind and c.reason and any(rule.matches_name(n) for n in c.names)]
    if reasoned:
        lines = "; ".join(f"'{c.name}' ({c.reason})" for c in reasoned[:5])
        return f"{rule!r} matched only uses of weights fxlora cannot adapt: {lines}. fxlora adapts {SUPPORTED}."
    params = [n for n, _ in root.named_parameters(remove_duplicate=False) if rule.matches_name(n)]
    if facts is not None:
        params += [n for n, _ in gm.named_parameters(remove_duplicate=False) if rule.matches_name(n) and n not in params]
    if params and facts is not None:
        lines = []
        for pname in params[:4]:
            owner = pname.rpartition(".")[0]
            leaf = facts.leaf_holding(pname)
            mod = try_submodule(root, owner) if owner else root
            found = _sites_of_param(gm, root, pname, candidates)
            if found is not None:
                sites, role = found
                named = ", ".join(f"'{name}'" for name in list(dict.fromkeys(c.name for c in sites))[:4])
                names = list(sites[0].names)
                best = owner if owner in names else names[0]  # the parameter's own module, when it can be named
                others = [n for n in names if n != best][:3]
                lines.append(
                    f"'{pname}' is the {role} of the site{'s' if named.count(',') else ''} {named}: rules name sites "
                    f"(modules), not their parameters; write Rule({best!r}, ...)"
                    + (f" (or any of {', '.join(map(repr, others))})" if others else "")
                )
            elif leaf is not None and not facts.export:
                lines.append(
                    f"'{pname}' is a parameter of '{owner}' ({type(mod).__name__}), inside '{leaf}', which symbolic "
                    f"tracing keeps opaque as a leaf module: only a torch.export graph shows the op that reads it; "
                    f"{_export_hint()}"
                )
            else:
                reads = facts.ops_reading(pname)
                what = f"it is read by {'; '.join(reads[:3])}, which fxlora does not adapt" if reads else "no op reads it"
                lines.append(f"'{pname}' is a parameter, not a site: {what}")
        return f"{rule!r} matched no module or site. " + "; ".join(lines) + "."
    text = rule.target[3:] if rule.target.startswith("re:") else rule.target  # type: ignore[union-attr]
    pool = list(dict.fromkeys(site_names + module_names))
    close = difflib.get_close_matches(text, pool, n=5, cutoff=0.4)
    if not close:
        close = pool[:5]
    return f"{rule!r} matched no module or site. Closest qualified names: {', '.join(close) or '(the model has none)'}."


def _sites_of_param(
    gm: GraphModule, root: nn.Module, pname: str, candidates: Sequence[Candidate]
) -> tuple[list[Candidate], str] | None:
    """The adaptable sites whose weight (or, failing that, bias) is parameter ``pname`` (by identity: a tied
    weight under any of its names), and which of the two it is; None when it is neither."""
    param = None
    for module in (gm, root):
        try:
            param = module.get_parameter(pname)
            break
        except AttributeError:
            continue
    if param is None:
        return None
    for role, attr in (("weight", "weight"), ("bias", "bias")):
        found = []
        for c in candidates:
            name = getattr(c, attr)
            if not c.kind or not name:
                continue
            try:
                if gm.get_parameter(name) is param:
                    found.append(c)
            except AttributeError:
                continue
        if found:
            return found, role
    return None


def _check_lora_names(gm: GraphModule, owner: str, names: Sequence[str], fail) -> None:
    owner_mod = try_submodule(gm, owner)
    for qualname in names:
        attr = qualname.rpartition(".")[2]
        if owner_mod is not None and hasattr(owner_mod, attr):
            raise fail(
                f"'{owner or '<root>'}' already has an attribute '{attr}' (a LoRA layer from another "
                "library?). Apply fxlora to the plain base model."
            )


def _make_spec(gm: GraphModule, cand: Candidate, rule: Rule, rule_index: int, adapter: str) -> SiteSpec:
    def fail(why: str) -> RuleError:
        return RuleError(f"{rule!r} selects '{cand.name}' ({cand.type_name}), but {why}")

    shape = cand.weight_shape
    kind = cand.kind
    fan = False
    if kind in ("linear", "experts"):
        if cand.layout_from_graph is not None:
            fan = cand.layout_from_graph
            if rule.fan_in_fan_out is not None and rule.fan_in_fan_out != fan:
                if kind == "experts":
                    how = "stores it (experts, in, out)" if fan else "stores it (experts, out, in)"
                    how = f"the graph reads the weight as one that {how}"
                else:
                    how = "the graph computes " + ("x @ W (weight stored (in, out))" if fan else "F.linear(x, W) (weight stored (out, in))")
                raise fail(
                    f"{how}, which contradicts fan_in_fan_out={rule.fan_in_fan_out}. "
                    "Drop fan_in_fan_out from the rule: fxlora reads the layout from the graph."
                )
        elif cand.custom_leaf:
            fan = bool(rule.fan_in_fan_out)
        elif rule.fan_in_fan_out:
            raise fail(
                "nn.Linear always stores its weight as (out, in); fan_in_fan_out=True is for modules that compute "
                "x @ W + b with W stored (in, out), such as GPT-2's Conv1D. Drop fan_in_fan_out from the rule."
            )
    if kind == "linear":
        out_f, in_f = (shape[1], shape[0]) if fan else (shape[0], shape[1])
    elif kind == "experts":
        out_f, in_f = (shape[2], shape[1]) if fan else (shape[1], shape[2])
    elif kind == "embedding":
        in_f, out_f = shape
    elif kind == "conv_transpose":
        in_f, out_f = shape[0], shape[1] * cand.op["groups"]
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
    if rule.fan_in_fan_out is not None and kind not in ("linear", "experts"):
        raise fail("fan_in_fan_out applies only to linear and experts sites.")
    if kind in ("conv", "conv_transpose") and rule.r % cand.op["groups"] != 0:
        raise fail(
            f"it is a grouped {'transposed ' if kind == 'conv_transpose' else ''}convolution "
            f"(groups={cand.op['groups']}) and r={rule.r} is not divisible by the number of groups; each group gets "
            "rank r / groups. Choose r as a multiple of groups."
        )
    align = cand.op.get("align_bytes")
    if align:
        size = gm.get_parameter(cand.weight).element_size()
        if (rule.r * size) % align:
            step = max(1, align // size)
            raise fail(
                f"the graph reads it with {cand.type_name}, whose kernels need every stride a multiple of {align} bytes, "
                f"so the rank's too: r={rule.r} with {size}-byte elements is not. Choose r as a multiple of {step}."
            )
    lora_A, lora_B, dropout_module = lora_names(cand.owner, cand.prefix, adapter)
    _check_lora_names(gm, cand.owner, (lora_A, lora_B, dropout_module), fail)
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
        **_rule_fields(rule, rule_index, dropout),
        enable_lora=rule.enable_lora,
        fan_in_fan_out=fan,
        op=dict(cand.op),
        adapter=adapter,
    )


def _make_tied_spec(gm: GraphModule, members: Sequence[Candidate], rule: Rule, rule_index: int, adapter: str) -> SiteSpec:
    """The spec of a tied weight adapted at every use: ``members`` are its uses, in graph order."""
    first = members[0]
    names = ", ".join(f"'{m.name}' ({m.kind})" for m in members)

    def fail(why: str) -> RuleError:
        return RuleError(f"{rule!r} selects '{first.name}', whose weight is tied (read by {names}), but {why}")

    if rule.enable_lora is not None:
        raise fail("enable_lora does not apply to a tied weight: its update is one (rows x cols) matrix for every use.")
    uses: dict[str, dict[str, object]] = {}
    for m in members:
        if m.kind == "embedding":
            desc: dict[str, object] = {"kind": "embedding", **m.op}
        elif m.custom_leaf:
            desc = {"kind": "linear", "fan_in_fan_out": bool(rule.fan_in_fan_out)}
        else:
            fan = bool(m.layout_from_graph)
            if rule.fan_in_fan_out is not None and rule.fan_in_fan_out != fan:
                raise fail(
                    f"the graph reads it at '{m.name}' as a weight stored {'(in, out)' if fan else '(out, in)'}, which "
                    f"contradicts fan_in_fan_out={rule.fan_in_fan_out}. Drop fan_in_fan_out from the rule."
                )
            desc = {"kind": "linear", "fan_in_fan_out": fan}
        for node in m.nodes:
            uses[node.name] = desc
    rows, cols = first.weight_shape
    lora_A, lora_B, dropout_module = lora_names(first.owner, first.prefix, adapter)
    _check_lora_names(gm, first.owner, (lora_A, lora_B, dropout_module), fail)
    dropout = 0.0 if any(m.kind == "embedding" for m in members) else rule.dropout
    return SiteSpec(
        name=first.name,
        kind="tied",
        weight=first.weight,
        bias=None,
        lora_A=lora_A,
        lora_B=lora_B,
        dropout_module=dropout_module if dropout > 0 else None,
        weight_shape=(rows, cols),
        in_features=cols,
        out_features=rows,
        **_rule_fields(rule, rule_index, dropout),
        enable_lora=None,
        fan_in_fan_out=False,
        op={"uses": uses, "first_use": first.kind, "names": tuple(dict.fromkeys(n for m in members for n in m.names))},
        adapter=adapter,
    )


def _rule_fields(rule: Rule, rule_index: int, dropout: float) -> dict[str, Any]:
    """The fields of a :class:`SiteSpec` that come from the rule that selected the site."""
    return {
        "r": rule.r,
        "alpha": rule.alpha,
        "dropout": dropout,
        "rule": repr(rule),
        "rule_index": rule_index,
        "rule_target": rule.target_text,
    }
