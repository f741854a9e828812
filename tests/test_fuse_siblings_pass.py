"""The fuse-siblings pass: LoRA branches that read the same input share one A-matmul."""

from __future__ import annotations

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule
from torch import nn

from helpers import op_sequence, randomize_lora


class Attention(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.gate, self.up = nn.Linear(d, 32), nn.Linear(d, 32)
        self.down = nn.Linear(32, d)

    def forward(self, x):
        h = self.ln(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)
        x = x + att
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


RULES = [Rule("q", r=4, alpha=8), Rule("k", r=2, alpha=2), Rule("v", r=4, alpha=8),
         Rule("gate", r=3, alpha=3), Rule("up", r=3, alpha=6), Rule("down", r=2, alpha=2)]


def _a_matmuls(gm):
    """F.linear nodes that multiply by an A factor (one per branch, or one per fused group)."""
    def is_a(node):
        info = node.meta.get("fxlora", {})
        return info.get("role") == "lora_A" or (node.target is torch.cat and "fused" in info)

    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear and is_a(n.args[1]))


def _fused_groups(gm):
    return [n.meta["fxlora"]["fused"] for n in gm.graph.nodes if n.target is torch.cat and "fused" in n.meta.get("fxlora", {})]


def _pair():
    torch.manual_seed(0)
    model = Attention()
    plain = fxlora.rewrite(model, RULES)
    randomize_lora(plain)
    fused = fxlora.rewrite(model, RULES, fuse_siblings=True)
    fxlora.load_lora_state_dict(fused, fxlora.lora_state_dict(plain))
    return model, plain, fused


def test_fused_branches_compute_the_same_and_fold_the_same():
    model, plain, fused = _pair()
    fused.graph.lint()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(fused(x), plain(x), atol=1e-6, rtol=1e-6)
    assert list(fxlora.lora_state_dict(fused)) == list(fxlora.lora_state_dict(plain))
    assert sorted(map(sorted, _fused_groups(fused))) == [["gate", "up"], ["k", "q", "v"]]
    assert _a_matmuls(plain) == 6 and _a_matmuls(fused) == 3  # {q, k, v}, {gate, up} and down
    folded = fxlora.fold(fused)
    torch.testing.assert_close(folded(x), plain(x), atol=1e-5, rtol=1e-5)
    assert op_sequence(folded) == op_sequence(torch.fx.symbolic_trace(model))


def test_gradients_reach_every_fused_factor():
    _, plain, fused = _pair()
    x = torch.randn(2, 5, 16)
    for gm in (plain, fused):
        gm.zero_grad()
        gm(x).square().mean().backward()
    for name in fxlora.lora_parameter_names(plain):
        torch.testing.assert_close(fused.get_parameter(name).grad, plain.get_parameter(name).grad, atol=1e-6, rtol=1e-5)


def test_branches_with_dropout_keep_their_own_matmul_and_masked_ones_fuse():
    torch.manual_seed(0)
    rules = [Rule("q", r=4, alpha=8, dropout=0.1), Rule("k", r=2, alpha=2), Rule("v", r=4, alpha=8, enable_lora=[True, False])]
    model = Attention()
    plain = fxlora.rewrite(model, rules)
    randomize_lora(plain)
    before = fxlora.passes.counters["fuse_siblings"]["groups"]
    gm = fxlora.rewrite(model, rules, fuse_siblings=True)
    fxlora.load_lora_state_dict(gm, fxlora.lora_state_dict(plain))
    assert fxlora.passes.counters["fuse_siblings"]["groups"] == before + 1
    assert _fused_groups(gm) == [["k", "v"]] and _a_matmuls(gm) == 2  # q reads its own dropout output
    plain.eval(), gm.eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(gm(x), plain(x), atol=1e-6, rtol=1e-6)
    result = fxlora.passes.fuse_siblings(gm)
    assert result.modified is False  # nothing left to fuse: the pass says so
    assert fxlora.passes.counters["fuse_siblings"]["groups"] == before + 1


def test_merge_on_eval_with_fused_branches():
    model, plain, _ = _pair()
    fused = fxlora.rewrite(model, RULES, fuse_siblings=True, merge_on_eval=True)
    fxlora.load_lora_state_dict(fused, fxlora.lora_state_dict(plain))
    x = torch.randn(2, 5, 16)
    fused.eval()
    torch.testing.assert_close(fused(x), plain.eval()(x), atol=1e-5, rtol=1e-5)


def test_siblings_of_mixed_dtypes_are_not_fused_and_the_pass_says_so():
    from fxlora import passes
    from fxlora.passes.infra import counters

    torch.manual_seed(0)
    gm = fxlora.rewrite(Attention(), [Rule("gate", r=3, alpha=3), Rule("up", r=3, alpha=6)])  # one sibling pair
    gm.get_submodule("gate").lora_A = nn.Parameter(gm.get_submodule("gate").lora_A.detach().double())
    code, groups = gm.code, counters["fuse_siblings"]["groups"]
    result = passes.FuseSiblings()(gm)
    assert not result.modified and gm.code == code and counters["fuse_siblings"]["groups"] == groups
    # three siblings, one of another dtype: the other two fuse, and only they
    gm = fxlora.rewrite(Attention(), [Rule(n, r=2, alpha=2) for n in ("q", "k", "v")])
    gm.get_submodule("q").lora_A = nn.Parameter(gm.get_submodule("q").lora_A.detach().double())
    result = passes.FuseSiblings()(gm)
    assert result.modified and _fused_groups(gm) == [["k", "v"]]
    assert counters["fuse_siblings"]["groups"] == groups + 1
    for pass_ in (passes.FuseSiblings(), passes.LowerLinearBranches()):  # they require a rewritten graph
        with pytest.raises(fxlora.PassContractError, match="runs on a graph the rewrite pass made"):
            pass_(torch.fx.symbolic_trace(Attention()))
