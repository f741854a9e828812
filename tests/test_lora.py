"""The LoRA math of each kind: branch(x) == base_op(x, delta), shapes, initialisation."""

from __future__ import annotations

import math

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora.lora import delta_weight
from torch import nn

from helpers import op_sequence, randomize_lora

CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    "conv1d_reflect": (lambda: nn.Conv1d(4, 6, 3, padding=2, padding_mode="reflect", dilation=2), (2, 4, 9)),
    "conv2d_stride_dilation": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), (2, 4, 11, 11)),
    "conv2d_same_circular": (lambda: nn.Conv2d(4, 6, (3, 5), padding="same", padding_mode="circular"), (2, 4, 8, 9)),
    "conv2d_groups": (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), (2, 4, 7, 7)),
    "conv2d_depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (2, 2, 3, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_branch_equals_conv_with_the_folded_delta(case):
    make, shape = CONVS[case]
    torch.manual_seed(0)
    model = nn.Sequential(make())
    groups = model[0].groups
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=4 if groups <= 4 else groups, alpha=8)])
    randomize_lora(gm)
    x = torch.randn(*shape)
    unmerged = gm(x)
    assert not torch.allclose(unmerged, model(x), atol=1e-4)
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(x), unmerged, atol=1e-5, rtol=1e-5)
    assert op_sequence(folded) == op_sequence(torch.fx.symbolic_trace(model))
    spec = fxlora.graph_sites(gm)["0"]
    A, B = gm.get_parameter("0.lora_A"), gm.get_parameter("0.lora_B")
    W = model[0].weight
    assert A.shape == (4, W.shape[1], *W.shape[2:]) and B.shape == (W.shape[0], 4 // groups, *[1] * (W.dim() - 2))
    assert delta_weight(A, B, spec).shape == W.shape


def test_functional_conv_site():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.k = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.1)

        def forward(self, x):
            return F.conv2d(x, self.k, None, 1, 1)

    torch.manual_seed(0)
    model = M()
    gm = fxlora.rewrite(model, [fxlora.Rule("k", r=2, alpha=2)])
    randomize_lora(gm)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)
    assert set(fxlora.lora_state_dict(gm)) == {"k_lora_A", "k_lora_B"}


def test_initialisation_follows_loralib():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 64), nn.Conv1d(64, 4, 1))  # rewritten, not run
    gm = fxlora.rewrite(model, [fxlora.Rule("*", r=4, alpha=4)])
    A = gm.get_parameter("1.lora_A")
    bound = 1 / math.sqrt(8)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    assert torch.count_nonzero(gm.get_parameter("1.lora_B")) == 0
    assert torch.count_nonzero(gm.get_parameter("0.lora_A")) == 0  # Embedding: A zero, B normal
    assert gm.get_parameter("0.lora_B").std() > 0.5
    assert torch.count_nonzero(gm.get_parameter("2.lora_B")) == 0


def test_lora_parameters_take_the_base_dtype_and_device():
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=2, alpha=2)])
    assert gm.get_parameter("0.lora_A").dtype == torch.bfloat16


def test_custom_leaf_module_with_a_2d_weight():
    from helpers import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.Tanh(), Conv1D(4, 12))
    rules = [fxlora.Rule("*", r=2, alpha=2, fan_in_fan_out=True)]
    gm = fxlora.rewrite(model, rules, leaf_modules=[Conv1D])
    assert sum(n.op == "call_module" and n.target in ("0", "2") for n in gm.graph.nodes) == 2
    randomize_lora(gm)
    x = torch.randn(3, 8)
    traced_through = fxlora.rewrite(model, rules)  # the same model traced through Conv1D (addmm sites)
    fxlora.load_lora_state_dict(traced_through, fxlora.lora_state_dict(gm))
    torch.testing.assert_close(gm(x), traced_through(x))
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)
