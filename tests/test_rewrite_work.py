"""The work fxlora.rewrite does on a captured graph: each piece done once, and done the way torch would."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
from fxlora.tracing import copy_graph

from helpers import TinyTransformer


def _captures():
    model = TinyTransformer()
    idx = torch.randint(0, 40, (2, 5))
    symbolic = fxlora.capture(model, capture="symbolic")
    exported = fxlora.capture(model, capture="export", example_inputs=(idx,))
    rewritten = fxlora.rewrite(exported, [fxlora.Rule("blocks.*.qkv", r=2, alpha=4)])
    return {"symbolic": symbolic, "export": exported, "rewritten": rewritten}


@pytest.mark.parametrize("which", ["symbolic", "export", "rewritten"])
def test_copy_graph_is_deepcopy(which):
    gm = _captures()[which]
    theirs, ours = copy.deepcopy(gm.graph), copy_graph(gm.graph)
    ours.lint()
    assert ours.python_code("self").src == theirs.python_code("self").src
    assert type(ours._codegen) is type(theirs._codegen) and ours._codegen is not gm.graph._codegen
    assert ours._tracer_cls is theirs._tracer_cls
    for a, b, original in zip(theirs.nodes, ours.nodes, gm.graph.nodes, strict=True):
        assert (b.op, b.name, b.target, b.type) == (a.op, a.name, a.target, a.type)
        assert b.graph is ours
        assert b.meta == original.meta and b.meta is not original.meta
        assert [u.name for u in b.users] == [u.name for u in a.users]
        assert [n.name for n in b.all_input_nodes] == [n.name for n in a.all_input_nodes]
    # the copy's nodes are its own: editing it leaves the original alone
    before = str(gm.graph)
    for node in ours.nodes:
        node.meta["copied"] = True
    assert str(gm.graph) == before and not any("copied" in n.meta for n in gm.graph.nodes)
