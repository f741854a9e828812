"""Fuse-siblings pass: sibling LoRA branches that read the same input share one shrink matmul.

Attention blocks project one hidden state three times (q, k, v) and an MLP twice (gate, up); with LoRA
on each, every projection adds its own small ``x @ A_i.T``.  Seeing the whole graph, this pass groups
the linear branches whose *shrink* node (the role the rewrite pass gives ``A(x)``) reads the same input
node with factors of the same dtype, and replaces their shrinks by one::

    a   = cat([A_q, A_k, A_v])          # (r_q + r_k + r_v, in), a few kilobytes
    h   = linear(x, a)                  # one matmul over the activations instead of three
    h_q, h_k, h_v = split(h, [r_q, r_k, r_v], -1)

and each branch continues with its own expand.  Branches with dropout read their own dropout output,
so they are never siblings.  The parameters, their names and the state dict are unchanged; the fold
pass removes the fused nodes like any other branch node.  ``counters["fuse_siblings"]["groups"]``
counts the groups fused; the pass says ``modified=False`` when it fused none.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from fxlora import provenance

from .infra import PassResult, RewiringPass, check_contract, counters, finalize

__all__ = ["FuseSiblings", "fuse_siblings"]


def _groups(gm: GraphModule) -> list[list[Node]]:
    """Groups (in graph order, two or more each) of one adapter's linear shrink nodes ``F.linear(x, A)``
    that read the same ``x`` and whose A factors share a dtype."""
    by_input: dict[tuple[Node, torch.dtype, str], list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        info = provenance.node_info(node)
        if info is None or info["role"] != provenance.SHRINK or info["spec"].kind != "linear":
            continue
        if node.op != "call_function" or node.target is not F.linear or len(node.args) != 2:
            continue
        x, a = node.args
        if not (isinstance(a, Node) and a.op == "get_attr" and isinstance(x, Node)):
            continue
        by_input[(x, gm.get_parameter(a.target).dtype, info["adapter"])].append(node)
    return [members for members in by_input.values() if len(members) > 1]


class FuseSiblings(RewiringPass):
    """Fuse the shrinks of sibling linear branches (see the module docstring).

    Requires a rewritten graph; ensures the parameters (names and objects) are those it was given and
    no group of siblings is left unfused."""

    name = "fuse_siblings"

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        check_contract(not _groups(gm), "fuse_siblings left a group of sibling shrinks unfused")

    def call(self, gm: GraphModule) -> PassResult:
        groups = _groups(gm)
        if not groups:
            return PassResult(gm, False)
        graph = gm.graph
        for members in groups:
            first = members[0]
            x = first.args[0]
            ranks = [gm.get_parameter(m.args[1].target).shape[0] for m in members]
            a_nodes = [m.args[1] for m in members]
            for a in a_nodes:  # get_attr nodes have no inputs: they can move up to the fused matmul
                first.prepend(a)
            with graph.inserting_before(first):
                cat = graph.call_function(torch.cat, (a_nodes, 0))
                h = graph.call_function(F.linear, (x, cat))
                parts = graph.call_method("split", (h, ranks, -1))
                pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
            for new in (cat, h, parts, *pieces):
                new.meta.update({k: v for k, v in first.meta.items() if k != provenance.META_KEY})
            for member, piece in zip(members, pieces):
                info = provenance.node_info(member)
                provenance.tag(piece, info["spec"], provenance.SHRINK)
                member.replace_all_uses_with(piece)
                graph.erase_node(member)
            for new in (cat, h, parts):  # shared by the group: recorded under its first site
                provenance.tag(new, provenance.node_info(pieces[0])["spec"], provenance.SHRINK)
                new.meta[provenance.META_KEY]["fused"] = [provenance.node_info(p)["site"] for p in pieces]
        counters[self.name]["groups"] += len(groups)
        finalize(gm)
        return PassResult(gm, True)


def fuse_siblings(gm: GraphModule) -> PassResult:
    """Run :class:`FuseSiblings` on ``gm`` (in place)."""
    return FuseSiblings()(gm)
