"""loralib as the oracle: same base weights, same non-zero A/B, same numbers.

The fxlora model is the plain model (nn.Linear / nn.Embedding / GPT-2 Conv1D); the loralib model is
the same architecture with loralib's layers swapped in by hand, as loralib's users do.
"""

from __future__ import annotations

import fxlora
import loralib
import pytest
import torch
import torch.fx.passes.shape_prop  # noqa: F401
from torch import nn

from helpers import Conv1D

ATOL = 1e-5
D_IN, D_OUT, VOCAB = 16, 24, 30


class Plain(nn.Module):
    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_IN, padding_idx=0)
        self.fc = Conv1D(D_OUT, D_IN) if fan_in_fan_out else nn.Linear(D_IN, D_OUT)
        self.qkv = Conv1D(3 * D_IN, D_OUT) if fan_in_fan_out else nn.Linear(D_OUT, 3 * D_IN)
        self.out = nn.Linear(3 * D_IN, 4)

    def forward(self, idx):
        return self.out(torch.tanh(self.qkv(torch.tanh(self.fc(self.emb(idx))))))


class WithLoralib(nn.Module):
    def __init__(self, fan_in_fan_out: bool, r: int, alpha: int, mask: list[bool]) -> None:
        super().__init__()
        self.emb = loralib.Embedding(VOCAB, D_IN, r=r, lora_alpha=alpha, padding_idx=0)
        self.fc = loralib.Linear(D_IN, D_OUT, r=r, lora_alpha=alpha, fan_in_fan_out=fan_in_fan_out)
        self.qkv = loralib.MergedLinear(
            D_OUT, 3 * D_IN, r=r, lora_alpha=alpha, enable_lora=mask, fan_in_fan_out=fan_in_fan_out
        )
        self.out = nn.Linear(3 * D_IN, 4)

    forward = Plain.forward


def _rules(fan_in_fan_out, r, alpha, mask):
    fif = True if fan_in_fan_out else None
    return [
        fxlora.Rule("emb", r=r, alpha=alpha),
        fxlora.Rule("fc", r=r, alpha=alpha, fan_in_fan_out=fif),
        fxlora.Rule("qkv", r=r, alpha=alpha, enable_lora=mask, fan_in_fan_out=fif),
    ]


def _pair(fan_in_fan_out: bool, r: int = 4, alpha: int = 8, mask=(True, False, True)):
    torch.manual_seed(0)
    oracle = WithLoralib(fan_in_fan_out, r, alpha, list(mask))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero LoRA everywhere (loralib starts B or A at zero)
        for name, p in oracle.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    loralib.mark_only_lora_as_trainable(oracle)
    base = Plain(fan_in_fan_out)
    base_sd = {k: v for k, v in oracle.state_dict().items() if "lora_" not in k}
    base.load_state_dict(base_sd, strict=True)  # the same base weights (layouts agree, see Conv1D)
    gm = fxlora.rewrite(base, _rules(fan_in_fan_out, r, alpha, mask))
    fxlora.load_lora_state_dict(gm, loralib.lora_state_dict(oracle))  # a loralib checkpoint, as is
    return oracle, base, gm


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["plain", "fan_in_fan_out"])
@pytest.mark.parametrize("mask", [(True, False, True), (True, True, True), (False, True, False)])
def test_unmerged_and_folded_outputs_equal_loralib(fan_in_fan_out, mask):
    oracle, base, gm = _pair(fan_in_fan_out, mask=mask)
    idx = torch.randint(0, VOCAB, (3, 7))
    oracle.train()
    expected_unmerged = oracle(idx)
    got = gm(idx)
    torch.testing.assert_close(got, expected_unmerged, atol=ATOL, rtol=0)
    assert not torch.allclose(got, base(idx), atol=1e-3), "LoRA must change the output"

    folded = fxlora.fold(gm)
    oracle.eval()  # loralib merges into weight.data here
    torch.testing.assert_close(folded(idx), oracle(idx), atol=ATOL, rtol=0)
    torch.testing.assert_close(folded(idx), expected_unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["plain", "fan_in_fan_out"])
def test_lora_state_dict_keys_and_shapes_equal_loralib(fan_in_fan_out):
    oracle, _, gm = _pair(fan_in_fan_out, r=3, alpha=6, mask=(True, False, True))
    for bias in ("none", "all", "lora_only"):
        ours = {k: tuple(v.shape) for k, v in fxlora.lora_state_dict(gm, bias=bias).items()}
        theirs = {k: tuple(v.shape) for k, v in loralib.lora_state_dict(oracle, bias=bias).items()}
        assert ours == theirs, bias


def test_folded_weights_equal_loralib_merged_weights():
    oracle, _, gm = _pair(False)
    oracle.eval()
    folded = fxlora.fold(gm)
    for name in ("emb.weight", "fc.weight", "qkv.weight"):
        torch.testing.assert_close(folded.get_parameter(name), oracle.get_parameter(name), atol=ATOL, rtol=0)


def test_fxlora_checkpoint_loads_into_loralib():
    oracle, _, gm = _pair(False)
    fresh = WithLoralib(False, 4, 8, [True, False, True])
    fresh.load_state_dict({k: v for k, v in oracle.state_dict().items() if "lora_" not in k}, strict=False)
    fresh.load_state_dict(fxlora.lora_state_dict(gm), strict=False)
    idx = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(fresh(idx), gm(idx), atol=ATOL, rtol=0)


def test_merged_branch_never_builds_full_delta():
    """The fused-projection branch is a plain rank r*k branch with a block-structured B (out x r*k): no
    out x in delta (loralib's merge_AB in every forward) and no activation-sized zeros or slices."""
    _, _, gm = _pair(False)
    spec = fxlora.graph_sites(gm)["qkv"]
    assert spec.enable_lora == (True, False, True)
    idx = torch.randint(0, VOCAB, (4, 6))
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(idx)
    tokens, k = idx.numel(), sum(spec.enable_lora)
    sizes = {}
    for n in gm.graph.nodes:
        info = n.meta.get("fxlora", {})
        if info.get("site") == "qkv" and info["role"] in ("shrink", "expand") and "tensor_meta" in n.meta:
            sizes[n.name] = (info["role"], n.meta["tensor_meta"].shape.numel())
    full = {name for name, (role, size) in sizes.items() if size == tokens * spec.out_features}
    rank = {name for name, (role, size) in sizes.items() if size == tokens * spec.r * k}
    assert len(full) == 1  # the expand's (tokens, out), nothing else that big
    assert 1 <= len(rank) <= 2  # the shrink's (tokens, r*k), and the same times the scale
    outputs = full | rank
    for name, (role, size) in sizes.items():
        if name not in outputs:
            assert size <= spec.out_features * spec.r * k, (name, size)  # parameter-sized pieces only
    assert not any(n.target is torch.nn.functional.conv1d for n in gm.graph.nodes)


def test_train_mode_dropout_matches_loralib_draw_for_draw():
    """Same seed, same dropout masks: each site draws its mask on its input, in forward order, as loralib."""

    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = loralib.Linear(D_IN, D_OUT, r=2, lora_alpha=4, lora_dropout=0.3)
            self.qkv = loralib.MergedLinear(D_OUT, 3 * D_IN, r=2, lora_alpha=4, lora_dropout=0.3, enable_lora=[True, False, True])

        def forward(self, x):
            return self.qkv(torch.tanh(self.fc(x)))

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D_IN, D_OUT)
            self.qkv = nn.Linear(D_OUT, 3 * D_IN)

        forward = WithDropout.forward

    torch.manual_seed(0)
    oracle = WithDropout()
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    base = Base()
    base.load_state_dict({k: v for k, v in oracle.state_dict().items() if "lora_" not in k})
    gm = fxlora.rewrite(base, [fxlora.Rule("fc", r=2, alpha=4, dropout=0.3),
                               fxlora.Rule("qkv", r=2, alpha=4, dropout=0.3, enable_lora=[True, False, True])])
    fxlora.load_lora_state_dict(gm, loralib.lora_state_dict(oracle))
    x = torch.randn(6, D_IN)
    oracle.train()
    gm.train()
    torch.manual_seed(7)
    expected = oracle(x)
    torch.manual_seed(7)
    torch.testing.assert_close(gm(x), expected, atol=ATOL, rtol=0)
