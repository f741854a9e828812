"""Fuse-siblings pass: sibling LoRA branches that read the same input share one A-matmul.

Attention blocks project one hidden state three times (q, k, v) and an MLP twice (gate, up); with LoRA
on each, every projection adds its own small ``x @ A_i.T``.  Seeing the whole graph, this pass groups
the linear branches (no per-slice mask, no dropout, same dtype) whose input is the same node and
replaces their A-matmuls by one::

    a   = cat([A_q, A_k, A_v])          # (r_q + r_k + r_v, in), a few kilobytes
    h   = linear(x, a)                  # one matmul over the activations instead of three
    h_q, h_k, h_v = split(h, [r_q, r_k, r_v], -1)

and each branch continues with its own ``B_i`` and scale.  The parameters, their names and the
state dict are unchanged; the fold pass removes the fused nodes like any other branch node.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxlora.lora import META_KEY

from ._graph import finalize


def _a_matmuls(gm: GraphModule) -> dict[Node, list[tuple[Node, Node]]]:
    """input node -> [(A get_attr, A-matmul node)] for every fusable linear branch."""
    groups: dict[Node, list[tuple[Node, Node]]] = defaultdict(list)
    for node in gm.graph.nodes:
        info = node.meta.get(META_KEY)
        if info is None or info["role"] != "lora_A":
            continue
        spec = info["spec"]
        if spec.kind != "linear" or spec.enable_lora is not None or spec.dropout_module is not None:
            continue
        users = [u for u in node.users if u.op == "call_function" and u.target is F.linear and u.args[1] is node]
        if len(users) != 1 or len(node.users) != 1:
            continue
        matmul = users[0]
        groups[matmul.args[0]].append((node, matmul))
    return {x: members for x, members in groups.items() if len(members) > 1}


def fuse_siblings(gm: GraphModule) -> PassResult:
    """Fuse the A-matmuls of linear LoRA branches that read the same input node, in place."""
    groups = _a_matmuls(gm)
    if not groups:
        return PassResult(gm, False)
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for x, members in groups.items():
        dtypes = {gm.get_parameter(a.target).dtype for a, _ in members}
        if len(dtypes) != 1:
            continue
        members.sort(key=lambda m: order[m[1]])
        first = members[0][1]
        ranks = [gm.get_parameter(a.target).shape[0] for a, _ in members]
        meta = {k: v for k, v in first.meta.items() if k != META_KEY}
        meta[META_KEY] = {**first.meta[META_KEY], "role": "branch", "fused": [m[1].meta[META_KEY]["site"] for m in members]}
        a_nodes = [a for a, _ in members]
        for a in a_nodes:  # get_attr nodes have no inputs: they can move up to the fused matmul
            first.prepend(a)
        with graph.inserting_before(first):
            cat = graph.call_function(torch.cat, (a_nodes, 0))
            h = graph.call_function(F.linear, (x, cat))
            parts = graph.call_method("split", (h, ranks, -1))
            pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
        for new in (cat, h, parts, *pieces):
            new.meta.update(meta)
        for (_, matmul), piece in zip(members, pieces):
            matmul.replace_all_uses_with(piece)
            graph.erase_node(matmul)
    finalize(gm)
    return PassResult(gm, True)
