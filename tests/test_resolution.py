"""fxlora.resolution and fxlora.sites: which rule selects which site, and why a rule selects none."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule, RuleError
from torch import nn

from helpers import TinyTransformer, build_case, randomize_lora


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
    with pytest.raises(RuleError, match="max_norm"):
        fxlora.rewrite(nn.Sequential(nn.Embedding(5, 4, max_norm=1.0)), [fxlora.Rule("0", r=1, alpha=1)])


class WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_messages_speak_of_the_graph_that_was_captured():
    x = torch.randn(2, 5, 4)
    # symbolic graph: the LSTM is called (a leaf) but is not a kind fxlora adapts
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(WithLSTM(), [Rule("lstm", r=1, alpha=1)])
    assert "LSTM is not a module kind fxlora adapts" in str(info.value) and "weight_ih_l0" in str(info.value)
    # a type rule over modules that are called but unsupported says so (not "never called")
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(WithLSTM(), [Rule(nn.LSTM, r=1, alpha=1)])
    assert "are called, but fxlora cannot adapt them" in str(info.value) and "never called" not in str(info.value)
    # torch.export graph: the refusal names the ATen op that reads the weights
    for target in ("lstm", nn.LSTM):
        with pytest.raises(RuleError) as info:
            fxlora.rewrite(WithLSTM(), [Rule(target, r=1, alpha=1)], example_inputs=(x,), capture="export")
        msg = str(info.value)
        assert "torch.export graph" in msg and "aten.lstm" in msg and "never called" not in msg, msg


def test_a_parameter_only_an_export_graph_shows_asks_for_example_inputs():
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(WithMHA(), [Rule("attn.in_proj_weight", r=1, alpha=1)])
    msg = str(info.value)
    assert "'attn.in_proj_weight' is a parameter of 'attn' (MultiheadAttention)" in msg and "example_inputs" in msg
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(WithMHA(), [Rule("attn.out_proj", r=1, alpha=1)])
    assert "runs inside 'attn' (MultiheadAttention)" in str(info.value) and "example_inputs" in str(info.value)
    gm = fxlora.rewrite(WithMHA(), [Rule("attn.in_proj_weight", r=1, alpha=1)], example_inputs=(torch.randn(5, 2, 8),))
    assert list(fxlora.graph_sites(gm)) == ["attn.in_proj_weight"]


def test_type_rules_work_on_a_graph_module_captured_earlier():
    x = torch.randn(2, 5, 4)
    captured = fxlora.capture(WithLSTM(), example_inputs=(x,), capture="export")
    gm = fxlora.rewrite(captured, [Rule(nn.Linear, r=1, alpha=1)])
    assert list(fxlora.graph_sites(gm)) == ["head"]


def test_modules_fxlora_cannot_see_into_say_why():
    class MyLinear(nn.Linear):  # a Linear subclass computing something else, kept opaque
        def forward(self, x):
            return super().forward(x).relu()

    class LeftMatmul(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):  # x: (batch, 4, n)
            return self.w @ x

    model = nn.Sequential(MyLinear(4, 4))
    with pytest.raises(RuleError, match=r"overrides forward\(\), and it is kept as a leaf"):
        fxlora.rewrite(model, [Rule("0", r=1, alpha=1)], leaf_modules=[MyLinear])
    gm = fxlora.rewrite(model, [Rule("0", r=1, alpha=1)])  # traced through: its F.linear is the site
    assert fxlora.graph_sites(gm)["0"].kind == "linear"
    with pytest.raises(RuleError, match=r"left operand \(W @ x\)"):
        fxlora.rewrite(LeftMatmul(), [Rule("w", r=1, alpha=1)])
    with pytest.raises(RuleError, match="output_size"):

        class Up(nn.Module):
            def __init__(self):
                super().__init__()
                self.up = nn.ConvTranspose2d(2, 2, 3, stride=2)

            def forward(self, x):
                return self.up(x, output_size=[10, 10])

        fxlora.rewrite(Up(), [Rule("up", r=2, alpha=2)])


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




def test_functional_sites_read_layout_from_the_graph():
    model, x, _ = build_case("functional")
    gm = fxlora.rewrite(model, [fxlora.Rule("proj", r=2, alpha=2), fxlora.Rule("w2", r=2, alpha=2), fxlora.Rule("w1", r=2, alpha=2)])
    sites = fxlora.graph_sites(gm)
    assert sites["proj"].fan_in_fan_out and sites["w2"].fan_in_fan_out and not sites["w1"].fan_in_fan_out
    state = fxlora.lora_state_dict(gm)
    assert state["proj.lora_A"].shape == (2, 12) and state["proj.lora_B"].shape == (8, 2)
    assert state["w1_lora_A"].shape == (2, 8) and state["w1_lora_B"].shape == (12, 2)


def test_precedence_exact_over_pattern_over_type():
    model, _, _ = build_case("transformer")
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


class FalconStyleLinear(nn.Linear):
    """transformers' FalconLinear: an nn.Linear subclass computing ``input @ self.weight.T`` + bias."""

    def forward(self, input):
        return input @ self.weight.T + self.bias


class Spelled(nn.Module):
    """One matmul spelling on a weight stored (out, in), or (in, out) when ``stored_in_out``."""

    def __init__(self, fn, stored_in_out: bool):
        super().__init__()
        self.fn = fn
        self.W = nn.Parameter(torch.randn((5, 6) if stored_in_out else (6, 5)) * 0.3)
        self.b = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x):
        return torch.tanh(self.fn(x, self.W, self.b))


SPELLINGS = {
    "x @ W.T": (lambda x, W, b: x @ W.T, False),
    "x @ W.t()": (lambda x, W, b: x @ W.t(), False),
    "torch.matmul(x, W.transpose(0, 1))": (lambda x, W, b: torch.matmul(x, W.transpose(0, 1)), False),
    "x @ W.mT": (lambda x, W, b: x @ W.mT, False),
    "F.linear(x, W, b)": (lambda x, W, b: F.linear(x, W, b), False),
    "torch.addmm(b, x, W.t())": (lambda x, W, b: torch.addmm(b, x, W.t()), False),
    "torch.mm(x, W.permute(1, 0))": (lambda x, W, b: torch.mm(x, W.permute(1, 0)), False),
    "torch.mm(x, torch.t(W))": (lambda x, W, b: torch.mm(x, torch.t(W)), False),
    "x @ W": (lambda x, W, b: x @ W, True),
    "torch.addmm(b, x, W)": (lambda x, W, b: torch.addmm(b, x, W), True),
    "torch.mm(x, W)": (lambda x, W, b: torch.mm(x, W), True),
    "F.linear(x, W.t(), b)": (lambda x, W, b: F.linear(x, W.t(), b), True),
    "torch.matmul(x, W.T.T.T)": (lambda x, W, b: torch.matmul(x, W.T.T.T), False),
    # tensor-method spellings (call_method nodes in a symbolic graph) are sites like their function forms
    "x.matmul(W.T)": (lambda x, W, b: x.matmul(W.T), False),
    "x.mm(W.t())": (lambda x, W, b: x.mm(W.t()), False),
    "b.addmm(x, W.t())": (lambda x, W, b: b.addmm(x, W.t()), False),
    "x.matmul(W)": (lambda x, W, b: x.matmul(W), True),
    "b.addmm(x, W)": (lambda x, W, b: b.addmm(x, W), True),
}


class MethodLinear(nn.Linear):
    """An nn.Linear subclass whose forward uses the tensor-method spelling of its matmul."""

    def forward(self, input):
        return self.bias.addmm(input, self.weight.t())


@pytest.mark.parametrize("capture", ["symbolic", "export"])
@pytest.mark.parametrize("spelling", sorted(SPELLINGS) + ["FalconLinear", "MethodLinear"])
def test_matmul_sites_in_every_spelling_read_their_layout_from_the_graph(spelling, capture):
    torch.manual_seed(0)
    if spelling in ("FalconLinear", "MethodLinear"):
        cls = FalconStyleLinear if spelling == "FalconLinear" else MethodLinear
        model, stored_in_out, target, wname = nn.Sequential(cls(5, 6)), False, "0", "0.weight"
    else:
        fn, stored_in_out = SPELLINGS[spelling]
        model, target, wname = Spelled(fn, stored_in_out), "W", "W"
    x = torch.randn(3, 5)
    gm = fxlora.rewrite(model, [Rule(target, r=2, alpha=6)], capture=capture, example_inputs=(x,))
    (spec,) = fxlora.graph_sites(gm).values()
    assert spec.kind == "linear" and spec.fan_in_fan_out == stored_in_out, spec
    assert (spec.in_features, spec.out_features) == (5, 6)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    randomize_lora(gm, std=0.3)
    A, B = gm.get_parameter(spec.lora_A).detach(), gm.get_parameter(spec.lora_B).detach()
    delta = B @ A * 3.0  # (out, in): the update of an (out, in) weight; transposed for (in, out) storage
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.get_parameter(wname).add_(delta.T if stored_in_out else delta)
        assert not torch.allclose(ref(x), model(x), atol=1e-3)
        torch.testing.assert_close(gm(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), ref(x), atol=1e-5, rtol=1e-5)


def test_a_module_that_is_called_is_never_said_to_be_never_called():
    class Exp(nn.Linear):  # called, its weight read by an op fxlora does not adapt
        def forward(self, x):
            return x @ self.weight.exp().T

    class Ignores(nn.Linear):  # called, its weight read by nothing
        def forward(self, x):
            return x * 2

    class Model(nn.Sequential):
        def forward(self, x):  # `unused` is never called
            return self[2](self[1](self[0](x)))

    model = Model(Exp(3, 3), Ignores(3, 3), nn.Linear(3, 3))
    model.unused = nn.Linear(3, 3)
    with pytest.raises(RuleError, match=r"'0' \(Exp: in the traced graph its weights are read by exp") as info:
        fxlora.rewrite(model, [Rule("0", r=2, alpha=2)])
    assert "never called" not in str(info.value)
    with pytest.raises(RuleError, match=r"'1' \(Ignores is called in the traced graph, but no op there reads its weights"):
        fxlora.rewrite(model, [Rule("1", r=2, alpha=2)])
    with pytest.raises(RuleError, match=r"'unused' \(Linear is never called in the traced graph"):
        fxlora.rewrite(model, [Rule("unused", r=2, alpha=2)])


def test_a_rule_naming_a_sites_parameter_says_which_site_to_name():
    model = nn.Sequential(nn.Linear(4, 4))
    for capture in ("symbolic", "export"):
        with pytest.raises(RuleError, match=r"'0.weight' is the weight of the site '0'.*Rule\('0'"):
            fxlora.rewrite(model, [Rule("0.weight", r=2, alpha=2)], capture=capture, example_inputs=(torch.randn(2, 4),))


def test_a_type_rule_never_skips_a_module_silently(caplog):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.encoder(x))

    model = Encoder().eval()
    x = torch.randn(2, 5, 8)
    with caplog.at_level("WARNING", logger="fxlora"):
        plan = fxlora.plan(model, [Rule(nn.Linear, r=1, alpha=1)])  # symbolic: the encoder is a leaf
    assert [s.name for s in plan.sites] == ["head"] and plan.opaque
    assert {n for n, _ in plan.unreached} == {"encoder.layers.0.self_attn.out_proj", "encoder.layers.0.linear1", "encoder.layers.0.linear2"}
    assert "not these 3 modules they name" in caplog.text and "example_inputs" in caplog.text
    # with example inputs, capture='auto' sees them through torch.export
    gm = fxlora.rewrite(model, [Rule(nn.Linear, r=1, alpha=1)], example_inputs=(x,))
    assert gm.meta["fxlora_capture"] == "torch.export" and len(fxlora.graph_sites(gm)) == 4


def test_a_glob_that_names_modules_inside_an_opaque_leaf_recaptures_with_example_inputs():
    class WithMHA2(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0])

    x = torch.randn(2, 5, 8)
    plan = fxlora.plan(WithMHA2(), [Rule("*", r=1, alpha=1)])  # symbolic, no example inputs: said, not silent
    assert [s.name for s in plan.sites] == ["head"] and [n for n, _ in plan.unreached] == ["attn.out_proj"]
    gm = fxlora.rewrite(WithMHA2(), [Rule("*", r=1, alpha=1)], example_inputs=(x,))
    assert gm.meta["fxlora_capture"] == "torch.export"
    assert set(fxlora.graph_sites(gm)) == {"attn.in_proj_weight", "attn.out_proj", "head"}
