"""Tie analysis: which parameters are read by more than one use.

A LoRA update is folded into a *weight*; if that weight is also read elsewhere (GPT-2's token
embedding and LM head, or a weight passed both to its module and to an ``F.linear``), folding one site's
update would silently change the other use too.  This module builds the bipartite graph of parameters
and their uses (networkx) and refuses a site whose weight has a use outside the site.
"""

from __future__ import annotations

from typing import Iterable

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from .errors import RuleError
from .sites import Candidate, weight_source

__all__ = ["weight_uses", "check_ties", "describe_use"]

_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad", "is_sparse"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device", "nelement", "is_contiguous", "is_floating_point"})
_METADATA_OPS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.dim.default})


def _reads_only_metadata(node: Node) -> bool:
    """``W.shape``, ``W.dtype``, ``W.size(0)``...: a use that a LoRA update leaves unchanged."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    if node.op == "call_function" and node.target in _METADATA_OPS:
        return True
    return node.op == "call_method" and node.target in _METADATA_METHODS


def weight_uses(gm: GraphModule) -> nx.Graph:
    """The bipartite graph of parameters and the nodes that read them.

    A parameter node is ``("param", id(p))``; a use is the FX node of a ``call_module`` whose module
    holds the parameter, or of an op that takes its values from a ``get_attr`` (through a transpose
    view, the op that consumes the view).  Reading ``.shape``, ``.dtype`` or ``.size()`` is not a use.
    A parameter with more than one use is tied or shared.
    """
    g = nx.Graph()
    params = dict(gm.named_parameters(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for p in gm.get_submodule(node.target).parameters():
                g.add_edge(("param", id(p)), node)
        elif node.op == "get_attr" and node.target in params:
            key = ("param", id(params[node.target]))
            for user in node.users:
                if _reads_only_metadata(user):
                    continue
                source = weight_source(gm, user)
                consumers = [u for u in user.users if not _reads_only_metadata(u)] if source and source[2] else [user]
                for consumer in consumers:
                    g.add_edge(key, consumer)
    return g


def describe_use(node: Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    fn = getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack")
    where = f" in module '{list(stack.values())[-1][0]}'" if stack else ""
    return f"{fn}(...) at node '{node.name}'{where}"


def check_ties(gm: GraphModule, selected: Iterable[tuple[Candidate, str]]) -> None:
    """Refuse a selected candidate (with the text of the rule that selected it) whose weight is also read
    by a use outside the candidate: folding would change that use too."""
    uses = weight_uses(gm)
    for cand, rule_text in selected:
        key = ("param", id(gm.get_parameter(cand.weight)))
        others = sorted(set(uses.neighbors(key)) - set(cand.nodes), key=lambda n: n.name) if key in uses else []
        if others:
            described = ", ".join(describe_use(n) for n in others[:3])
            raise RuleError(
                f"site '{cand.name}' (selected by {rule_text}) adapts weight '{cand.weight}', which is also read by "
                f"{described} (a tied or shared weight). Folding the update into it would change that other use "
                "as well. Untie the weights before rewrite (give the other use its own "
                "nn.Parameter(weight.detach().clone())), or leave this site out of the rules."
            )
