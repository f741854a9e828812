"""fxlora.ties: tied and shared weights are found and refused, naming both uses."""

from __future__ import annotations

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule, RuleError
from torch import nn

from helpers import randomize_lora


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


class TiedLM(nn.Module):
    """GPT-2 style: the LM head reuses the token embedding's weight."""

    def __init__(self, functional_head: bool = False):
        super().__init__()
        self.wte = nn.Embedding(30, 8)
        self.proj = nn.Linear(8, 8)
        self.functional_head = functional_head
        if not functional_head:
            self.lm_head = nn.Linear(8, 30, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        h = torch.tanh(self.proj(self.wte(idx)))
        return F.linear(h, self.wte.weight) if self.functional_head else self.lm_head(h)


@pytest.mark.parametrize("functional_head", [False, True])
@pytest.mark.parametrize("target", ["wte", "lm_head", "*"])
def test_tied_embedding_and_head_are_refused_naming_both_uses(functional_head, target):
    model = TiedLM(functional_head)
    if functional_head and target == "lm_head":
        target = "wte"  # the functional head is named after the weight it reads
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(model, [Rule(target, r=2, alpha=2)])
    msg = str(info.value)
    assert "tied or shared" in msg and "Untie" in msg
    assert ("lm_head" in msg or "linear" in msg) and "wte" in msg


def test_untied_model_adapts_both_and_folds_each_once():
    model = TiedLM()
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())  # untie, as the error says
    gm = fxlora.rewrite(model, [Rule("wte", r=2, alpha=2), Rule("lm_head", r=2, alpha=2)])
    randomize_lora(gm)
    x = torch.randint(0, 30, (2, 5))
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)


def test_unadapted_tied_weights_stay_tied_and_untouched():
    model = TiedLM()
    gm = fxlora.rewrite(model, [Rule("proj", r=2, alpha=2)])
    randomize_lora(gm)
    folded = fxlora.fold(gm)
    assert folded.get_parameter("wte.weight") is folded.get_parameter("lm_head.weight")
    assert torch.equal(folded.get_parameter("wte.weight"), model.wte.weight)


def test_a_weight_read_by_a_module_and_a_functional_call_is_refused():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + F.linear(x, self.fc.weight)

    with pytest.raises(RuleError, match="also read by"):
        fxlora.rewrite(TwoUses(), [Rule("fc", r=1, alpha=1)])


def test_reading_a_weights_shape_or_dtype_is_not_a_second_use():
    class Peeks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype)) * self.fc.weight.shape[0] + self.fc.weight.size(1)

    model = Peeks()
    gm = fxlora.rewrite(model, [Rule("fc", r=1, alpha=1)])
    randomize_lora(gm)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)
