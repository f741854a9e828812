"""The lower pass: each adapted linear call and its branch become one fxlora::lora_linear op, with the
same outputs and gradients (the composite path on CPU; the fused kernels are tested in test_ops.py)."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
from fxlora import Rule
from fxlora.passes import lower_linear_branches
from torch.fx import GraphModule

from helpers import Functional, TinyTransformer, randomize_lora

CASES = {
    "masked_qkv_and_plain": (TinyTransformer, lambda: torch.randint(0, 40, (2, 5)),
                             [Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]), Rule("head", r=3, alpha=3)], False, 3),
    "fused_siblings": (TinyTransformer, lambda: torch.randint(0, 40, (2, 5)),
                       [Rule("blocks.*.qkv", r=2, alpha=4), Rule("blocks.*.proj", r=2, alpha=2)], True, 4),
    "functional_module_called_twice_x_at_w": (Functional, lambda: torch.randn(2, 3, 8), [Rule("*", r=2, alpha=4)], False, 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lowered_graph_computes_the_same_outputs_and_gradients(case):
    factory, inputs, rules, fuse, calls = CASES[case]
    torch.manual_seed(0)
    gm = fxlora.rewrite(factory(), rules, fuse_siblings=fuse)
    randomize_lora(gm)
    lowered = GraphModule(gm, copy.deepcopy(gm.graph))  # the same parameter objects
    result = lower_linear_branches(lowered)
    lowered.graph.lint()
    ops = [n for n in lowered.graph.nodes if n.target in (torch.ops.fxlora.lora_linear.default, torch.ops.fxlora.lora_linear_h.default)]
    assert result.modified and len(ops) == calls
    assert not any(n.meta.get("fxlora", {}).get("role") in ("add", "expand") for n in lowered.graph.nodes if n.target is torch.nn.functional.linear)
    x = inputs()
    expected = gm(x)
    expected.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    out = lowered(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert set(grads) == {n for n, p in gm.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(gm.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4)
    assert lower_linear_branches(lowered).modified is False  # nothing left to lower


def test_chained_adapters_lower_the_first_and_custom_leaves_are_left_alone():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [Rule("head", r=2, alpha=2)], adapter="a")
    fxlora.add_adapter(gm, [Rule("head", r=2, alpha=2)], "b")
    fxlora.set_adapter(gm, ["a", "b"])
    randomize_lora(gm)
    lowered = GraphModule(gm, copy.deepcopy(gm.graph))
    assert lower_linear_branches(lowered).modified is True
    kinds = [n.meta["fxlora"]["role"] for n in lowered.graph.nodes if n.meta.get("fxlora", {}).get("role") in ("lowered", "add")]
    assert kinds == ["lowered", "add"]  # base + a's branch in one op, b's branch added after it
    x = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(lowered(x), gm(x), atol=1e-5, rtol=1e-5)
    from helpers import Conv1D

    leaf = fxlora.rewrite(torch.nn.Sequential(Conv1D(4, 6)), [Rule("0", r=2, alpha=2, fan_in_fan_out=True)], leaf_modules=[Conv1D])
    assert lower_linear_branches(GraphModule(leaf, copy.deepcopy(leaf.graph))).modified is False


def test_the_lowered_graph_exports_and_compiles_without_a_graph_break():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), CASES["masked_qkv_and_plain"][2])
    randomize_lora(gm)
    lowered = GraphModule(gm, copy.deepcopy(gm.graph))
    lower_linear_branches(lowered)
    x = torch.randint(0, 40, (2, 5))
    program = torch.export.export(lowered, (x,))
    assert any(n.target is torch.ops.fxlora.lora_linear.default for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), gm(x), atol=1e-5, rtol=1e-5)
    compiled = torch.compile(lowered, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), gm(x), atol=1e-5, rtol=1e-5)
