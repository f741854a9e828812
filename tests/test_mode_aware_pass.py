"""torch.export capture of plain modules: train/eval behaviour comes back live, the model is untouched."""

from __future__ import annotations

import copy

import fxlora
import torch
from torch import nn


class ConvBNDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.d = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.d(self.bn(self.c(x)).mean((2, 3))))


def test_batch_norm_and_dropout_follow_train_and_eval():
    torch.manual_seed(0)
    model = ConvBNDrop()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)
        model.bn.running_var.fill_(2.0)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    gm = fxlora.rewrite(model, [fxlora.Rule("c", r=2, alpha=2)], example_inputs=(x,), capture="export")
    assert gm.meta["fxlora_capture"] == "torch.export" and not gm.training  # handed back in the model's mode
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # eval: running statistics, no dropout
        gm.train()
        a, b = gm(x), gm(x)
        assert not torch.equal(a, b)  # dropout live
        ref = copy.deepcopy(model).train()
        ref.d.p = 0.0
        gm_nodrop = fxlora.rewrite(ref, [fxlora.Rule("c", r=2, alpha=2)], example_inputs=(x,), capture="export")
        gm_nodrop.train()
        torch.testing.assert_close(gm_nodrop(x), ref(x))  # train: batch statistics, like the module
    running = dict(gm.named_buffers())["bn.running_mean"]
    assert not torch.allclose(running, torch.full_like(running, 0.3))  # gm's own statistics moved
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())  # the model's did not
