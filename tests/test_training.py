"""Training a rewritten module end to end: the loss falls."""

from __future__ import annotations

import fxlora
import torch
from torch import nn

from helpers import TinyTransformer

RULES = [
    fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]),
    fxlora.Rule("blocks.*.proj", r=4, alpha=8),
]


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
