"""Tie analysis: which parameters are read by more than one use, and what a rule over one use adapts.

A LoRA update is folded into a *weight*; if that weight is also read elsewhere (GPT-2's token
embedding and LM head, or a weight passed both to its module and to an ``F.linear``), the update
reaches every use once it is folded.  So a rule that selects one use of a tied weight adapts the
weight (``tied="adapt"``, the default): one LoRA pair, applied at *every* use, folded once, and the
folded weights stay tied.  With ``tied="refuse"`` such a rule is refused instead, naming both uses.

This module builds the bipartite graph of parameters and their uses (networkx), following the views
a use reads the weight through (transposes, expert indexing), and groups the candidates that read one
weight.  A tied weight with a use fxlora cannot adapt (an op that is not a site) is refused in either
mode.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from .errors import ArgumentError, RuleError
from .sites import Candidate, get_parameter, get_submodule, op_name, view_step

__all__ = ["TIED_MODES", "weight_uses", "check_ties", "describe_use", "tie_groups", "check_tied_mode"]

#: What a rule that selects one use of a tied weight does: adapt the weight at every use, or refuse.
TIED_MODES = ("adapt", "refuse")

#: Kinds of use a tied weight may have for fxlora to adapt it at every use.
TIED_USE_KINDS = ("linear", "embedding")

_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad", "is_sparse"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device", "nelement", "is_contiguous", "is_floating_point"})
_METADATA_OPS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default})


def check_tied_mode(tied: object) -> str:
    if tied not in TIED_MODES:
        raise ArgumentError(
            f"tied must be one of {', '.join(map(repr, TIED_MODES))}, got {tied!r}: 'adapt' gives a tied weight one "
            "LoRA pair applied at every use, 'refuse' refuses a rule that selects a tied weight."
        )
    return tied  # type: ignore[return-value]


def _reads_only_metadata(node: Node) -> bool:
    """``W.shape``, ``W.dtype``, ``W.size(0)``...: a use that a LoRA update leaves unchanged."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    if node.op == "call_function" and node.target in _METADATA_OPS:
        return True
    return node.op == "call_method" and node.target in _METADATA_METHODS


def _consumers(node: Node, ndim: int | None) -> Iterable[Node]:
    """The nodes that compute with the values ``node`` (a parameter, or a view of one with ``ndim`` dims)
    holds: its users, and the users of the views it goes through (transposes, expert indexing)."""
    for user in node.users:
        if _reads_only_metadata(user):
            continue
        step = view_step(user, ndim) if user.args and user.args[0] is node else None
        if step is None:
            yield user
        else:
            yield from _consumers(user, step[1])


def weight_uses(gm: GraphModule) -> nx.Graph:
    """The bipartite graph of parameters and the nodes that read them.

    A parameter node is ``("param", id(p))``; a use is the FX node of a ``call_module`` whose module
    holds the parameter, or of an op that computes with its values (through views: the op that consumes
    the view).  Reading ``.shape``, ``.dtype`` or ``.size()`` is not a use.  A parameter with more than
    one use is tied or shared.
    """
    g = nx.Graph()
    params = dict(gm.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for p in get_submodule(gm, node.target).parameters():
                g.add_edge(("param", id(p)), node)
        elif node.op == "get_attr" and node.target in params:
            p = params[node.target]
            for consumer in _consumers(node, p.dim()):
                g.add_edge(("param", id(p)), consumer)
    return g


def describe_use(node: Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    stack = node.meta.get("nn_module_stack")
    where = f" in module '{list(stack.values())[-1][0]}'" if stack else ""
    return f"{op_name(node.target)}(...) at node '{node.name}'{where}"


def _others(gm: GraphModule, uses: nx.Graph, cand: Candidate) -> list[Node]:
    key = ("param", id(get_parameter(gm, cand.weight)))
    if key not in uses:
        return []
    return sorted(set(uses.neighbors(key)) - set(cand.nodes), key=lambda n: n.name)


def check_ties(gm: GraphModule, selected: Iterable[tuple[Candidate, str]]) -> None:
    """Refuse a selected candidate (with the text of the rule that selected it) whose weight is also read
    by a use outside the candidate (``tied="refuse"``)."""
    uses = weight_uses(gm)
    for cand, rule_text in selected:
        others = _others(gm, uses, cand)
        if others:
            raise RuleError(
                f"site '{cand.name}' (selected by {rule_text}) adapts weight '{cand.weight}', which is also read by "
                f"{', '.join(describe_use(n) for n in others[:3])} (a tied or shared weight), and tied='refuse' was "
                "asked: folding the update into it would change that other use as well. Untie the weights before "
                "rewrite (give the other use its own nn.Parameter(weight.detach().clone())), leave this site out of "
                "the rules, or drop tied='refuse' to adapt the weight at every use with one LoRA pair."
            )


def tie_groups(
    gm: GraphModule, candidates: Sequence[Candidate], selected: Sequence[tuple[Candidate, str]], tied: str
) -> list[list[Candidate]]:
    """The sites to adapt, each a list of candidates that read one weight: ``[cand]`` for a weight with no
    other use, every use of the weight (in graph order, selected or not) for a tied one.

    Raises :class:`~fxlora.errors.RuleError` (before any change) for ``tied="refuse"`` and a tied weight,
    or a tied weight that is also read by an op fxlora cannot adapt, or by a use of another kind than
    linear or embedding.
    """
    check_tied_mode(tied)
    if tied == "refuse":
        check_ties(gm, selected)
        return [[cand] for cand, _ in selected]
    uses = weight_uses(gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    groups: list[list[Candidate]] = []
    seen: dict[int, int] = {}  # id(param) -> index in groups
    for cand, rule_text in selected:
        param = get_parameter(gm, cand.weight)
        if id(param) in seen:
            continue
        others = _others(gm, uses, cand)
        if not others:
            seen[id(param)] = len(groups)
            groups.append([cand])
            continue
        members = [c for c in candidates if c.weight and c.kind and _same_param(gm, c.weight, param)]
        covered = {n for c in members for n in c.nodes}
        uncovered = [n for n in others if n not in covered]
        if uncovered:
            why = []
            for n in uncovered[:3]:
                reasoned = next((c for c in candidates if n in c.nodes and c.reason), None)
                why.append(describe_use(n) + (f" ({reasoned.reason})" if reasoned else ", an op fxlora does not adapt"))
            raise RuleError(
                f"site '{cand.name}' (selected by {rule_text}) adapts weight '{cand.weight}', a tied or shared weight "
                f"that is also read by {'; '.join(why)}. A tied weight is adapted at every use, and fxlora cannot "
                "add the update to that one, so folding would change what it computes. Untie the weights before "
                "rewrite (give that use its own nn.Parameter(weight.detach().clone())), or leave this site out of the "
                "rules."
            )
        wrong = [c for c in members if c.kind not in TIED_USE_KINDS or len(c.weight_shape) != 2]
        if wrong:
            raise RuleError(
                f"site '{cand.name}' (selected by {rule_text}) adapts weight '{cand.weight}', which is tied with "
                f"'{wrong[0].name}' ({wrong[0].kind}). fxlora adapts a tied weight when every use is a linear or "
                "an embedding use; untie the weights before rewrite, or leave this site out of the rules."
            )
        members.sort(key=lambda c: min(order[n] for n in c.nodes))
        seen[id(param)] = len(groups)
        groups.append(members)
    return groups


def _same_param(gm: GraphModule, name: str, param: torch.Tensor) -> bool:
    try:
        return get_parameter(gm, name) is param
    except AttributeError:
        return False
