"""Every bad input raises its FxLoraError subclass, names what is wrong and the fix, changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxlora
from fxlora import CheckpointError, FoldError, FxLoraError, RuleError, TraceError
from helpers import TinyTransformer, randomize_lora


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def _unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state) and flags == {
        n: p.requires_grad for n, p in model.named_parameters()
    }


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"r": 0, "alpha": 1}, "r must be a positive int"),
        ({"r": -2, "alpha": 1}, "r must be a positive int"),
        ({"r": 2.5, "alpha": 1}, "r must be a positive int"),
        ({"r": 2, "alpha": 0}, "alpha must be a positive"),
        ({"r": 2, "alpha": -1.0}, "alpha must be a positive"),
        ({"r": 2, "alpha": float("nan")}, "alpha must be a positive"),
        ({"r": 2, "alpha": 2, "dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"r": 2, "alpha": 2, "dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"r": 2, "alpha": 2, "enable_lora": [False, False]}, "no True entry"),
        ({"r": 2, "alpha": 2, "enable_lora": []}, "enable_lora is empty"),
        ({"r": 2, "alpha": 2, "enable_lora": [1, 0]}, "list of bools"),
    ],
)
def test_bad_rule_arguments(kwargs, text):
    with pytest.raises(RuleError) as info:
        fxlora.Rule("blocks.*.qkv", **kwargs)
    assert text in str(info.value)
    assert "blocks.*.qkv" in str(info.value)


def test_bad_targets():
    with pytest.raises(RuleError, match="not a valid regular expression"):
        fxlora.Rule("re:blocks.(", r=1, alpha=1)
    with pytest.raises(RuleError, match="nn.Module subclass"):
        fxlora.Rule(3, r=1, alpha=1)
    with pytest.raises(RuleError, match="target is empty"):
        fxlora.Rule("", r=1, alpha=1)
    with pytest.raises(RuleError, match="rules is empty"):
        fxlora.rewrite(TinyTransformer(), [])
    with pytest.raises(RuleError, match="rules must be a Rule or a list"):
        fxlora.rewrite(TinyTransformer(), "blocks.0.qkv")


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


def test_tied_weights_are_refused_naming_both_uses():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(20, 8)
            self.lm_head = nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, idx):
            return self.lm_head(self.wte(idx))

    with pytest.raises(RuleError) as info:
        fxlora.rewrite(Tied(), [fxlora.Rule("wte", r=2, alpha=2)])
    assert "wte.weight" in str(info.value) and "lm_head" in str(info.value) and "Untie" in str(info.value)


def test_untraceable_model_names_the_construct():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(TraceError) as info:
        fxlora.rewrite(Branchy(), [fxlora.Rule("fc", r=1, alpha=1)])
    msg = str(info.value)
    assert "Branchy" in msg and "if x.sum() > 0" in msg and "test_errors.py" in msg and "concrete_args" in msg
    assert isinstance(info.value, FxLoraError)


def test_rewriting_twice_is_refused():
    gm = fxlora.rewrite(TinyTransformer(), [fxlora.Rule("head", r=1, alpha=1)])
    with pytest.raises(RuleError, match="already carries a LoRA branch"):
        fxlora.rewrite(gm, [fxlora.Rule("head", r=1, alpha=1)])


def test_bad_bias_mode_and_non_lora_modules():
    with pytest.raises(fxlora.ArgumentError, match="bias must be one of"):
        fxlora.rewrite(TinyTransformer(), [fxlora.Rule("head", r=1, alpha=1)], bias="some")
    plain = torch.fx.symbolic_trace(TinyTransformer())
    calls = [
        lambda m: fxlora.fold(m),
        lambda m: fxlora.lora_state_dict(m),
        lambda m: fxlora.load_lora_state_dict(m, {}),
        lambda m: fxlora.mark_only_lora_as_trainable(m),
        lambda m: fxlora.save_lora(m, "unused.safetensors"),
        lambda m: fxlora.load_lora(m, "unused.safetensors"),
        lambda m: fxlora.save_peft_adapter(m, "unused"),
        lambda m: fxlora.load_peft_adapter(m, "unused"),
        lambda m: fxlora.lora_parameter_names(m),
    ]
    for module in (plain, TinyTransformer()):  # one error type, from one helper, everywhere
        for call in calls:
            with pytest.raises(fxlora.NotRewrittenError, match="expects the graph module returned by fxlora.rewrite"):
                call(module)


def _gm():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [fxlora.Rule("blocks.*.qkv", r=2, alpha=2), fxlora.Rule("head", r=2, alpha=2)])
    randomize_lora(gm)
    return gm


@pytest.mark.parametrize(
    "mutate, text",
    [
        (lambda sd: sd.pop("head.lora_A"), "missing LoRA keys: head.lora_A"),
        (lambda sd: sd.__setitem__("head.lora_C", torch.zeros(1)), "unexpected keys: head.lora_C"),
        (lambda sd: sd.__setitem__("head.lora_A", torch.zeros(3, 16)), "has shape (3, 16), the model expects (2, 16)"),
        (lambda sd: sd.__setitem__("head.lora_B", torch.zeros(40, 2, dtype=torch.long)), "must be floating point"),
        (lambda sd: sd.__setitem__("head.lora_B", [1, 2]), "not a tensor"),
    ],
)
def test_bad_checkpoints_load_nothing(mutate, text):
    gm = _gm()
    good = {k: torch.randn_like(v) for k, v in fxlora.lora_state_dict(gm).items()}
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    mutate(good)
    with pytest.raises(CheckpointError) as info:
        fxlora.load_lora_state_dict(gm, good)
    assert text in str(info.value) and "nothing was loaded" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_non_finite_adapter_is_refused_at_fold():
    gm = _gm()
    with torch.no_grad():
        gm.get_parameter("blocks.1.qkv.lora_B")[0, 0] = float("nan")
    with pytest.raises(FoldError, match="blocks.1.qkv"):
        fxlora.fold(gm)
