"""LoRA-only checkpoints: safetensors files, metadata checks, all-or-nothing loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxlora
from fxlora import CheckpointError
from helpers import TinyTransformer, randomize_lora

RULES = [fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]), fxlora.Rule("head", r=2, alpha=2)]


def _trained(seed=0):
    torch.manual_seed(seed)
    model = TinyTransformer()
    gm = fxlora.rewrite(model, RULES)
    randomize_lora(gm, seed=seed)
    return model, gm


def test_save_then_load_into_a_fresh_rewrite_round_trips_bit_exactly(tmp_path):
    model, gm = _trained()
    path = fxlora.save_lora(gm, tmp_path / "adapter.safetensors")
    fresh = fxlora.rewrite(model, RULES)
    fxlora.load_lora(fresh, path)
    for k, v in fxlora.lora_state_dict(gm).items():
        assert torch.equal(fxlora.lora_state_dict(fresh)[k], v)
    x = torch.randint(0, 40, (2, 5))
    assert torch.equal(fresh(x), gm(x))
    # kilobytes, not the model: the file holds the LoRA tensors only
    lora_bytes = sum(v.numel() * 4 for v in fxlora.lora_state_dict(gm).values())
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    size = path.stat().st_size
    assert lora_bytes <= size < lora_bytes + 4096 and size < model_bytes / 4
    assert not list(tmp_path.glob(".*.tmp.*"))  # the temporary file was renamed away


def test_bias_is_saved_when_asked(tmp_path):
    model, gm = _trained()
    fxlora.mark_only_lora_as_trainable(gm, bias="lora_only")
    with torch.no_grad():
        gm.get_parameter("head.bias").add_(1.0)
    path = fxlora.save_lora(gm, tmp_path / "a.safetensors", bias="lora_only")
    fresh = fxlora.rewrite(model, RULES)
    fxlora.load_lora(fresh, path)
    assert torch.equal(fresh.get_parameter("head.bias"), gm.get_parameter("head.bias"))
    assert not torch.equal(model.head.bias, gm.get_parameter("head.bias"))  # model untouched


def test_wrong_alpha_or_rank_is_refused(tmp_path):
    model, gm = _trained()
    path = fxlora.save_lora(gm, tmp_path / "a.safetensors")
    other_alpha = fxlora.rewrite(model, [fxlora.Rule("blocks.*.qkv", r=4, alpha=4, enable_lora=[True, False, True]), RULES[1]])
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(other_alpha).items()}
    with pytest.raises(CheckpointError, match="alpha=8.*alpha=4"):
        fxlora.load_lora(other_alpha, path)
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(other_alpha).items())
    other_rank = fxlora.rewrite(model, [fxlora.Rule("blocks.*.qkv", r=2, alpha=8, enable_lora=[True, False, True]), RULES[1]])
    with pytest.raises(CheckpointError, match="r=4"):
        fxlora.load_lora(other_rank, path)


def test_truncated_or_missing_files_are_refused(tmp_path):
    _, gm = _trained()
    path = fxlora.save_lora(gm, tmp_path / "a.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fxlora.load_lora(gm, bad)
    with pytest.raises(CheckpointError, match="no LoRA checkpoint"):
        fxlora.load_lora(gm, tmp_path / "absent.safetensors")
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(gm).items())


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    _, gm = _trained()
    other = fxlora.rewrite(nn.Sequential(nn.Linear(4, 4)), [fxlora.Rule("0", r=2, alpha=2)])
    path = fxlora.save_lora(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="missing LoRA keys.*unexpected keys: 0.lora_A"):
        fxlora.load_lora(gm, path)
