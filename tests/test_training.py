"""Training through the rewritten graph: what trains, that the loss falls, dropout modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxlora
from helpers import TinyTransformer, randomize_lora

RULES = [
    fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]),
    fxlora.Rule("blocks.*.proj", r=4, alpha=8),
]


def _grads(gm, x):
    gm.zero_grad(set_to_none=True)
    gm(x).float().logsumexp(-1).mean().backward()
    return {n for n, p in gm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_lora_and_selected_biases_get_gradients(bias):
    torch.manual_seed(0)
    model = TinyTransformer()
    gm = fxlora.rewrite(model, RULES, bias=bias)
    randomize_lora(gm)
    lora = set(fxlora.lora_parameter_names(gm))
    got = _grads(gm, torch.randint(0, 40, (2, 5)))
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert got == trainable
    if bias == "none":
        assert trainable == lora
    elif bias == "all":
        assert trainable == lora | {n for n, _ in gm.named_parameters() if n.endswith(".bias")}
    else:
        assert trainable == lora | {f"blocks.{i}.{m}.bias" for i in range(2) for m in ("qkv", "proj")}
    assert all(p.requires_grad for p in model.parameters()), "the input model's flags changed"


def test_mark_only_lora_as_trainable_switches_modes():
    gm = fxlora.rewrite(TinyTransformer(), RULES)
    fxlora.mark_only_lora_as_trainable(gm, bias="lora_only")
    assert gm.get_parameter("blocks.0.qkv.bias").requires_grad
    fxlora.mark_only_lora_as_trainable(gm)
    assert not gm.get_parameter("blocks.0.qkv.bias").requires_grad


def test_a_short_training_loop_lowers_the_loss():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=40, d=32)
    gm = fxlora.rewrite(model, RULES + [fxlora.Rule("head", r=8, alpha=16, dropout=0.05)])
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 40, (16, 8))
    y = (x * 7 + 3) % 40  # a fixed token map the frozen base does not know
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(gm(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    gm.eval()
    with torch.no_grad():
        folded_loss = nn.functional.cross_entropy(fxlora.fold(gm)(x).flatten(0, 1), y.flatten())
        assert abs(folded_loss.item() - nn.functional.cross_entropy(gm(x).flatten(0, 1), y.flatten()).item()) < 1e-4


def test_dropout_is_live_in_train_and_off_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=4, alpha=4, dropout=0.5)])
    randomize_lora(gm)
    x = torch.randn(16, 32)
    gm.train()
    a, b = gm(x), gm(x)
    assert not torch.allclose(a, b)
    gm.eval()
    c, d = gm(x), gm(x)
    assert torch.equal(c, d)
    no_dropout = fxlora.rewrite(model, [fxlora.Rule("0", r=4, alpha=4)])
    fxlora.load_lora_state_dict(no_dropout, fxlora.lora_state_dict(gm))
    torch.testing.assert_close(c, no_dropout(x))
    assert gm.get_submodule("0.lora_dropout").p == 0.5
