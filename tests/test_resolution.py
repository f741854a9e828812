"""fxlora.resolution and fxlora.sites: which rule selects which site, and why a rule selects none."""

from __future__ import annotations

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule, RuleError
from torch import nn

from helpers import (
    ConvNet,
    Functional,
    TinyTransformer,
    randomize_lora,
)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def _unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state) and flags == {
        n: p.requires_grad for n, p in model.named_parameters()
    }


def test_rule_matching_nothing_lists_the_closest_names():
    model = TinyTransformer()
    snap = _snapshot(model)
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(model, [fxlora.Rule("blocks.0.qvk", r=2, alpha=2)])
    msg = str(info.value)
    assert "Rule('blocks.0.qvk'" in msg and "matched no module" in msg and "blocks.0.qkv" in msg
    assert _unchanged(model, snap)


def test_a_later_bad_rule_fails_before_any_change():
    model = TinyTransformer()
    snap = _snapshot(model)
    with pytest.raises(RuleError):
        fxlora.rewrite(model, [fxlora.Rule("blocks.*.qkv", r=2, alpha=2), fxlora.Rule("nope", r=2, alpha=2)])
    assert _unchanged(model, snap)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_unsupported_site_kinds():
    model = TinyTransformer()
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(model, [fxlora.Rule("blocks.0.ln", r=2, alpha=2)])
    assert "blocks.0.ln" in str(info.value) and "LayerNorm" in str(info.value) and "fxlora adapts" in str(info.value)
    with pytest.raises(RuleError, match="container"):
        fxlora.rewrite(model, [fxlora.Rule("blocks.0", r=2, alpha=2)])
    with pytest.raises(RuleError, match="has no LayerNorm|no site"):
        fxlora.rewrite(nn.Sequential(nn.Linear(2, 2)), [fxlora.Rule(nn.LayerNorm, r=1, alpha=1)])
    with pytest.raises(RuleError, match="transposed convolution"):
        fxlora.rewrite(nn.Sequential(nn.ConvTranspose2d(2, 2, 3)), [fxlora.Rule("0", r=1, alpha=1)])
    with pytest.raises(RuleError, match="max_norm"):
        fxlora.rewrite(nn.Sequential(nn.Embedding(5, 4, max_norm=1.0)), [fxlora.Rule("0", r=1, alpha=1)])

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.raises(RuleError, match="never called"):
        fxlora.rewrite(WithMHA(), [fxlora.Rule("attn.out_proj", r=1, alpha=1)])


def test_enable_lora_length_must_divide_out_features():
    model = TinyTransformer(d=16)  # qkv has 48 outputs
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(model, [fxlora.Rule("blocks.0.qkv", r=2, alpha=2, enable_lora=[True] * 5)])
    assert "does not divide its 48 output features" in str(info.value) and "blocks.0.qkv" in str(info.value)
    with pytest.raises(RuleError, match="only to linear"):
        fxlora.rewrite(model, [fxlora.Rule("emb", r=2, alpha=2, enable_lora=[True, False])])


def test_fan_in_fan_out_contradictions():
    with pytest.raises(RuleError, match="nn.Linear always stores its weight as"):
        fxlora.rewrite(TinyTransformer(), [fxlora.Rule("head", r=2, alpha=2, fan_in_fan_out=True)])
    from helpers import Conv1D

    with pytest.raises(RuleError, match="contradicts fan_in_fan_out=False"):
        fxlora.rewrite(nn.Sequential(Conv1D(4, 6)), [fxlora.Rule("0", r=2, alpha=2, fan_in_fan_out=False)])


def test_grouped_conv_rank_must_divide_groups():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4))
    with pytest.raises(RuleError, match="r=2 is not divisible"):
        fxlora.rewrite(model, [fxlora.Rule("0", r=2, alpha=2)])


def test_rewriting_twice_is_refused():
    gm = fxlora.rewrite(TinyTransformer(), [fxlora.Rule("head", r=1, alpha=1)])
    with pytest.raises(RuleError, match="already carries a LoRA branch"):
        fxlora.rewrite(gm, [fxlora.Rule("head", r=1, alpha=1)])


CASES = {
    "transformer": (
        TinyTransformer,
        lambda: (torch.randint(0, 40, (2, 6)),),
        [
            fxlora.Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]),
            fxlora.Rule("re:blocks\\.\\d+\\.proj", r=3, alpha=3),
            fxlora.Rule(nn.Embedding, r=4, alpha=8),
            fxlora.Rule("head", r=2, alpha=2),
        ],
    ),
    "convnet": (ConvNet, lambda: (torch.randn(2, 3, 11, 11),), [fxlora.Rule("c*", r=2, alpha=4), fxlora.Rule("fc", r=1, alpha=1)]),
    "functional": (Functional, lambda: (torch.randn(3, 5, 8),), [fxlora.Rule("*", r=2, alpha=4)]),
}


def _build(case):
    factory, inputs, rules = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    return model, inputs(), rules


def test_functional_sites_read_layout_from_the_graph():
    model, x, _ = _build("functional")
    gm = fxlora.rewrite(model, [fxlora.Rule("proj", r=2, alpha=2), fxlora.Rule("w2", r=2, alpha=2), fxlora.Rule("w1", r=2, alpha=2)])
    sites = fxlora.graph_sites(gm)
    assert sites["proj"].fan_in_fan_out and sites["w2"].fan_in_fan_out and not sites["w1"].fan_in_fan_out
    state = fxlora.lora_state_dict(gm)
    assert state["proj.lora_A"].shape == (2, 12) and state["proj.lora_B"].shape == (8, 2)
    assert state["w1_lora_A"].shape == (2, 8) and state["w1_lora_B"].shape == (12, 2)


def test_precedence_exact_over_pattern_over_type():
    model, _, _ = _build("transformer")
    rules = [
        fxlora.Rule(nn.Linear, r=1, alpha=1),
        fxlora.Rule("blocks.*", r=2, alpha=2),
        fxlora.Rule("blocks.0.proj", r=3, alpha=3),
        fxlora.Rule("re:blocks\\.\\d\\.proj", r=4, alpha=4),
    ]
    sites = fxlora.graph_sites(fxlora.rewrite(model, rules))
    assert sites["blocks.0.proj"].r == 3  # exact name
    assert sites["blocks.1.proj"].r == 2  # first pattern listed
    assert sites["blocks.0.qkv"].r == 2
    assert sites["head"].r == 1  # type
    assert "emb" not in sites


def test_a_module_shared_under_two_names_is_one_site():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = self.a  # the same module registered twice

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Shared()
    for target in ("a", "b"):  # either name selects it
        gm = fxlora.rewrite(model, [Rule(target, r=2, alpha=2)])
        assert list(fxlora.graph_sites(gm)) == ["a"]
        randomize_lora(gm)
        x = torch.randn(3, 6)
        ref = model.a.weight + gm.get_parameter("a.lora_B") @ gm.get_parameter("a.lora_A")
        manual = F.linear(torch.relu(F.linear(x, ref, model.a.bias)), ref, model.a.bias)
        torch.testing.assert_close(gm(x), manual, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), manual, atol=1e-5, rtol=1e-5)
