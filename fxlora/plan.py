"""Resolve rules to sites before anything changes (the "plan").

Like FX quantization's qconfig resolution, every candidate site of the graph is found first, every
rule is resolved against them with a documented precedence, and every site is validated; only a plan
that is complete and valid is handed to the rewrite pass.  A bad rule therefore fails before the
graph or any module is touched, and the report prints the very same plan.

Candidate sites:

* ``call_module`` nodes of ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d``, and of custom leaf
  modules with a 2-D ``weight`` parameter (``x @ W.T + b``, or ``x @ W + b`` with
  ``fan_in_fan_out=True``);
* ``call_function`` nodes whose weight argument is a ``get_attr`` of a parameter:
  ``F.linear(x, W, b)``, ``torch.addmm(b, x, W)`` and ``x @ W`` / ``torch.matmul(x, W)`` /
  ``torch.mm(x, W)`` (weight stored ``(in, out)``: ``fan_in_fan_out`` read from the graph),
  ``F.embedding(idx, W)`` and ``F.conv1d/2d/3d(x, W, b, ...)``.  Such a site is named after its
  weight: ``blocks.0.fc.weight`` gives the site ``blocks.0.fc``; a parameter not called ``weight``
  keeps its full name (``blocks.0.w1``).
"""

from __future__ import annotations

import difflib
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .errors import RuleError
from .lora import META_KEY, SiteSpec
from .rules import Rule

__all__ = ["Candidate", "PlannedSite", "Plan", "find_candidates", "make_plan", "META_KEY"]

aten = torch.ops.aten

_LINEAR_FNS: dict[Callable[..., Any], tuple[str, ...]] = {
    F.linear: ("input", "weight", "bias"),
    torch.addmm: ("input", "mat1", "mat2", "beta", "alpha"),
    torch.matmul: ("input", "other"),
    operator.matmul: ("input", "other"),
    torch.mm: ("input", "mat2"),
    # torch.export (ATen) graphs
    aten.linear.default: ("input", "weight", "bias"),
    aten.addmm.default: ("input", "mat1", "mat2", "beta", "alpha"),
    aten.mm.default: ("input", "mat2"),
    aten.matmul.default: ("input", "other"),
}
_EMBEDDING_FNS: dict[Callable[..., Any], tuple[str, ...]] = {
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
    aten.embedding.default: ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse"),
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_FNS: dict[Callable[..., Any], tuple[str, ...]] = {
    **{fn: _CONV_ARGS for fn in (F.conv1d, F.conv2d, F.conv3d)},
    **{fn: _CONV_ARGS for fn in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)},
    **{fn: _CONV_ARGS for fn in (aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)},
    aten.convolution.default: (
        "input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"
    ),
}
_FN_SIGS = {**_LINEAR_FNS, **_EMBEDDING_FNS, **_CONV_FNS}
# the weight argument, when it is not called "weight"
_WEIGHT_ARG = {
    torch.addmm: "mat2", torch.matmul: "other", operator.matmul: "other", torch.mm: "mat2",
    aten.addmm.default: "mat2", aten.mm.default: "mat2", aten.matmul.default: "other",
}
_INPUT_ARG = {torch.addmm: "mat1", aten.addmm.default: "mat1"}
_ADDMM = (torch.addmm, aten.addmm.default)
_LINEAR_LAYOUT = (F.linear, aten.linear.default)  # weight (out, in); the others compute x @ W

SUPPORTED = (
    "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, leaf modules with a 2-D weight, and F.linear / torch.addmm / "
    "x @ W / F.embedding / F.conv1d/2d/3d calls on a parameter"
)


@dataclass
class Candidate:
    """A place in the graph where a LoRA branch could go (or a module a rule may name that cannot)."""

    name: str
    kind: str | None  # "linear" | "embedding" | "conv", or None when fxlora cannot adapt it
    nodes: list[Node] = field(default_factory=list)  # the call nodes (one per call of the module)
    inputs: list[int | str] = field(default_factory=list)  # where each call node takes the branch input
    module: nn.Module | None = None
    names: tuple[str, ...] = ()  # every qualified name a rule may use for it
    weight: str = ""  # qualified name of the weight parameter in the graph module
    bias: str | None = None
    weight_shape: tuple[int, ...] = ()
    layout_from_graph: bool | None = None  # functional sites: True when the graph computes x @ W
    op: dict[str, Any] = field(default_factory=dict)
    owner: str = ""  # module path on which the LoRA parameters are registered
    prefix: str = ""  # attribute prefix of the LoRA parameters ("" or "<param>_")
    reason: str | None = None  # why it cannot be adapted
    type_name: str = ""


@dataclass
class PlannedSite:
    spec: SiteSpec
    candidate: Candidate
    rule: Rule
    rule_index: int
    shadowed: list[Rule] = field(default_factory=list)  # other rules that also matched, and lost


@dataclass
class Plan:
    sites: list[PlannedSite]
    rules: list[Rule]
    candidates: list[Candidate]

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)


# --------------------------------------------------------------------------------------------- #
# Candidates
# --------------------------------------------------------------------------------------------- #


def _normalize(node: Node) -> dict[str, Any]:
    names = _FN_SIGS[node.target]  # type: ignore[index]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _module_names(root: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in root.named_modules(remove_duplicate=False):
        if name:
            names[id(mod)].append(name)
    return names


def _is_torch_nn(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("torch.nn")


def _classify_module(cand: Candidate, mod: nn.Module) -> None:
    cand.type_name = type(mod).__name__
    weight = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
        cand.reason = f"{cand.type_name} has uninitialized (lazy) parameters; run one forward pass before rewrite"
        return
    if isinstance(mod, nn.Linear):
        cand.kind = "linear"
        cand.op = {"module": True}
    elif isinstance(mod, nn.Embedding):
        cand.kind = "embedding"
        if mod.max_norm is not None:
            cand.kind, cand.reason = None, (
                "nn.Embedding with max_norm renormalizes its weight in place during forward, which an "
                "additive LoRA update cannot follow; set max_norm=None or leave this module out"
            )
            return
        cand.op = {"padding_idx": mod.padding_idx, "scale_grad_by_freq": mod.scale_grad_by_freq, "sparse": mod.sparse}
    elif isinstance(mod, nn.modules.conv._ConvNd):
        if mod.transposed:
            cand.reason = f"{cand.type_name} is a transposed convolution, which fxlora does not adapt"
            return
        cand.kind = "conv"
        cand.op = {
            "stride": tuple(mod.stride),
            "padding": mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
            "dilation": tuple(mod.dilation),
            "groups": mod.groups,
            "padding_mode": mod.padding_mode,
            "reversed_padding": tuple(mod._reversed_padding_repeated_twice),
        }
    elif not _is_torch_nn(mod) and isinstance(weight, nn.Parameter) and weight.dim() == 2 and not list(mod.children()):
        cand.kind = "linear"  # a custom leaf like GPT-2's Conv1D: layout from the rule
        cand.op = {"module": True, "custom": True}
    else:
        cand.reason = f"{cand.type_name} is not a module kind fxlora adapts"
        return
    if not isinstance(weight, nn.Parameter):
        cand.kind, cand.reason = None, f"{cand.type_name} has no weight parameter"
        return
    cand.weight_shape = tuple(weight.shape)
    bias = getattr(mod, "bias", None)
    cand.bias = f"{cand.name}.bias" if isinstance(bias, nn.Parameter) else None


def _param_of(gm: GraphModule, node: Any) -> str | None:
    """The qualified name of the parameter a ``get_attr`` node reads, else None."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)  # type: ignore[arg-type]
    except AttributeError:
        return None
    return node.target if isinstance(value, nn.Parameter) else None  # type: ignore[return-value]


def _try_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _owner_of(gm: GraphModule, root: nn.Module, node: Node, wname: str) -> tuple[str, str]:
    """The module that owns a functional site's weight, and the weight's attribute name there.

    torch.export graphs record the module that ran each op in ``nn_module_stack``; when that module
    holds the weight (by identity: a tied weight may be read under another name), the site is named
    after it, so the same rule text selects the same sites whichever way the model was captured.
    Otherwise the weight's own path decides (``blocks.0.fc.weight`` -> ``blocks.0.fc``).
    """
    param = gm.get_parameter(wname)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        mod = _try_submodule(root, path) if isinstance(path, str) else None
        if mod is not None:
            for attr, p in mod._parameters.items():
                if p is param:
                    return path, attr
    owner, _, attr = wname.rpartition(".")
    return owner, attr


def _functional_candidate(gm: GraphModule, node: Node, root: nn.Module) -> Candidate | None:
    args = _normalize(node)
    fn = node.target
    wname = _param_of(gm, args.get(_WEIGHT_ARG.get(fn, "weight")))  # type: ignore[arg-type]
    if wname is None:
        return None
    weight = gm.get_parameter(wname)
    owner, attr = _owner_of(gm, root, node, wname)
    if attr == "weight" and owner:
        name, prefix = owner, ""
        module = _try_submodule(root, owner)  # for type rules: the layer that owns the weight
    else:
        name, prefix, module = (f"{owner}.{attr}" if owner else attr), f"{attr}_", None
    cand = Candidate(name=name, kind=None, names=(name,), weight=wname, owner=owner, prefix=prefix, module=module)
    cand.weight_shape = tuple(weight.shape)
    cand.type_name = getattr(fn, "__name__", str(fn))
    in_name = _INPUT_ARG.get(fn, "input")
    sig = _FN_SIGS[fn]  # type: ignore[index]
    position = sig.index(in_name)
    cand.inputs = [position if position < len(node.args) else in_name]
    cand.nodes = [node]
    if fn in _LINEAR_FNS:
        if weight.dim() != 2:
            cand.reason = f"{cand.type_name} with a {weight.dim()}-D weight is not a linear layer"
            return cand
        if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
            cand.reason = "torch.addmm with beta or alpha other than 1"
            return cand
        cand.kind = "linear"
        cand.layout_from_graph = fn not in _LINEAR_LAYOUT
        bias_arg = args.get("input") if fn in _ADDMM else args.get("bias")
        cand.bias = _param_of(gm, bias_arg)
    elif fn in _EMBEDDING_FNS:
        if args.get("max_norm") is not None:
            cand.reason = "F.embedding with max_norm renormalizes its weight in place during forward"
            return cand
        cand.kind = "embedding"
        padding_idx = args.get("padding_idx")
        cand.op = {
            "padding_idx": None if padding_idx is None or padding_idx < 0 else padding_idx,
            "scale_grad_by_freq": bool(args.get("scale_grad_by_freq", False)),
            "sparse": bool(args.get("sparse", False)),
        }
    else:
        ndim = weight.dim() - 2
        if args.get("transposed"):
            cand.reason = "a transposed convolution, which fxlora does not adapt"
            return cand

        def tup(v: Any, default: int) -> Any:
            if isinstance(v, str):
                return v
            v = default if v is None else v
            return tuple(v) if isinstance(v, (list, tuple)) else (v,) * ndim

        padding = tup(args.get("padding"), 0)
        cand.kind = "conv"
        cand.op = {
            "stride": tup(args.get("stride"), 1),
            "padding": padding,
            "dilation": tup(args.get("dilation"), 1),
            "groups": int(args.get("groups") or 1),
            "padding_mode": "zeros",
        }
        cand.bias = _param_of(gm, args.get("bias"))
    # Hyper-parameters (stride, padding, beta...) computed in the graph cannot be baked into the branch;
    # the input, the weight and the bias may be anything (the branch reads only the input).
    data_args = {in_name, _WEIGHT_ARG.get(fn, "weight"), "bias", "input"}
    for key, value in args.items():
        if key in data_args:
            continue
        if isinstance(value, Node):
            cand.kind, cand.reason = None, f"{cand.type_name} has an argument computed in the graph ({value.name})"
            return cand
    return cand


def find_candidates(gm: GraphModule, root: nn.Module | None = None) -> list[Candidate]:
    """Every call site in ``gm`` that a rule may select, in graph order, one per module or weight."""
    root = gm if root is None else root
    aliases = _module_names(root)
    by_key: dict[tuple[str, str], Candidate] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            key = ("module", node.target)
            if key not in by_key:
                mod = gm.get_submodule(node.target)
                names = tuple(dict.fromkeys([node.target, *aliases.get(id(_root_module(root, node.target, mod)), [])]))
                cand = Candidate(name=node.target, kind=None, module=mod, names=names, owner=node.target)
                _classify_module(cand, mod)
                cand.weight = f"{node.target}.weight" if cand.kind else ""
                by_key[key] = cand
            cand = by_key[key]
            cand.nodes.append(node)
            cand.inputs.append(0 if node.args else next(iter(node.kwargs), "input"))
        elif node.op == "call_function" and node.target in _FN_SIGS:
            fc = _functional_candidate(gm, node, root)
            if fc is None:
                continue
            key = ("function", fc.name, fc.kind, fc.layout_from_graph)  # one site per weight *use*
            if key in by_key:
                by_key[key].nodes.extend(fc.nodes)
                by_key[key].inputs.extend(fc.inputs)
            else:
                by_key[key] = fc
    return list(by_key.values())


def input_of(node: Node, where: int | str) -> Node:
    """The node a site's call ``node`` takes as the branch input (read at rewrite time)."""
    return node.args[where] if isinstance(where, int) else node.kwargs[where]  # type: ignore[return-value]


def _root_module(root: nn.Module, target: str, default: nn.Module) -> nn.Module:
    try:
        return root.get_submodule(target)
    except AttributeError:
        return default


# --------------------------------------------------------------------------------------------- #
# Rule resolution
# --------------------------------------------------------------------------------------------- #


def _rule_matches(rule: Rule, cand: Candidate) -> bool:
    if isinstance(rule.target, type):
        return rule.matches_module(cand.module)
    return any(rule.matches_name(n) for n in cand.names)


def _explain_unmatched(rule: Rule, candidates: Sequence[Candidate], root: nn.Module) -> str:
    module_names = [n for n, _ in root.named_modules(remove_duplicate=False) if n]
    called = {n for c in candidates for n in c.names}
    site_names = [c.name for c in candidates if c.kind]
    if isinstance(rule.target, type):
        hits = [n for n, m in root.named_modules() if n and isinstance(m, rule.target)]
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


def make_plan(gm: GraphModule, rules: Sequence[Rule], root: nn.Module | None = None) -> Plan:
    """Resolve ``rules`` against ``gm``'s candidate sites and validate every site; change nothing."""
    root = gm if root is None else root
    candidates = find_candidates(gm, root)
    for cand in candidates:
        if META_KEY in cand.nodes[0].meta:
            raise RuleError(
                f"'{cand.name}' already carries a LoRA branch (this graph module was made by fxlora.rewrite). "
                "Fold it first (fxlora.fold) to stack a new adapter on the merged weights."
            )
    winners: dict[int, PlannedSite] = {}
    for index, rule in enumerate(rules):
        matched_any = False
        for cand in candidates:
            if not cand.kind or not _rule_matches(rule, cand):
                continue
            matched_any = True
            current = winners.get(id(cand))
            if current is None or (rule.tier, index) < (current.rule.tier, current.rule_index):
                lost = [] if current is None else [current.rule, *current.shadowed]
                winners[id(cand)] = PlannedSite(
                    spec=None, candidate=cand, rule=rule, rule_index=index, shadowed=lost  # type: ignore[arg-type]
                )
            else:
                current.shadowed.append(rule)
        if not matched_any:
            raise RuleError(_explain_unmatched(rule, candidates, root))
    sites = [winners[id(c)] for c in candidates if c.kind and id(c) in winners]
    _check_ties(gm, sites, candidates)
    for site in sites:
        site.spec = _make_spec(gm, site.candidate, site.rule, site.rule_index)
    return Plan(sites=sites, rules=list(rules), candidates=candidates)


def _describe_use(node: Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    fn = getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack")
    where = f" in module '{list(stack.values())[-1][0]}'" if stack else ""
    return f"{fn}(...) at node '{node.name}'{where}"


_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad", "is_sparse"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device", "nelement", "is_contiguous", "is_floating_point"})


def _reads_only_metadata(node: Node) -> bool:
    """``W.shape``, ``W.dtype``, ``W.size(0)``...: a use that a LoRA update leaves unchanged."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


def weight_uses(gm: GraphModule) -> nx.Graph:
    """The bipartite graph of parameters and the nodes that read them.

    A parameter node is ``("param", id(p))``; a use is the FX node of a ``call_module`` whose module
    holds the parameter, or of an op that takes its values from a ``get_attr`` (reading ``.shape``,
    ``.dtype`` or ``.size()`` is not a use).  A parameter with more than one use is tied or shared.
    """
    g = nx.Graph()
    params = {name: p for name, p in gm.named_parameters(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for p in gm.get_submodule(node.target).parameters():
                g.add_edge(("param", id(p)), node)
        elif node.op == "get_attr" and node.target in params:
            for user in node.users:
                if not _reads_only_metadata(user):
                    g.add_edge(("param", id(params[node.target])), user)
    return g


def _check_ties(gm: GraphModule, sites: Sequence[PlannedSite], candidates: Sequence[Candidate]) -> None:
    """Refuse a site whose weight is also read by another use: folding would change that use too."""
    uses = weight_uses(gm)
    for site in sites:
        key = ("param", id(gm.get_parameter(site.candidate.weight)))
        others = sorted(set(uses.neighbors(key)) - set(site.candidate.nodes), key=lambda n: n.name) if key in uses else []
        if others:
            described = ", ".join(_describe_use(n) for n in others[:3])
            raise RuleError(
                f"site '{site.candidate.name}' (selected by {site.rule!r}) adapts weight '{site.candidate.weight}', "
                f"which is also read by {described} (a tied or shared weight). Folding the update into it would "
                "change that other use as well. Untie the weights before rewrite (give the other use its own "
                "nn.Parameter(weight.detach().clone())), or leave this site out of the rules."
            )


def _make_spec(gm: GraphModule, cand: Candidate, rule: Rule, rule_index: int) -> SiteSpec:
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
        elif cand.op.get("custom"):
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
    owner_mod = _try_submodule(gm, cand.owner)
    prefix = cand.prefix
    for attr in ("lora_A", "lora_B", "lora_dropout"):
        if owner_mod is not None and hasattr(owner_mod, prefix + attr):
            raise fail(
                f"'{cand.owner or '<root>'}' already has an attribute '{prefix + attr}' (a LoRA layer from another "
                "library?). Apply fxlora to the plain base model."
            )
    dropout = rule.dropout if kind != "embedding" else 0.0

    def qual(attr: str) -> str:
        return f"{cand.owner}.{prefix}{attr}" if cand.owner else f"{prefix}{attr}"

    return SiteSpec(
        name=cand.name,
        kind=kind,  # type: ignore[arg-type]
        weight=cand.weight,
        bias=cand.bias,
        lora_A=qual("lora_A"),
        lora_B=qual("lora_B"),
        dropout_module=qual("lora_dropout") if dropout > 0 else None,
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
        op={k: v for k, v in cand.op.items() if k not in ("module", "custom")},
    )
