"""fxlora.ties: a rule over one use of a tied weight adapts the weight at every use (one pair, folded
once, weights still tied), or is refused with tied="refuse", naming both uses."""

from __future__ import annotations

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import ArgumentError, Rule, RuleError
from torch import nn

from helpers import op_sequence, randomize_lora


class TiedLM(nn.Module):
    """GPT-2 style: the LM head reuses the token embedding's weight (as a module, or functionally)."""

    def __init__(self, functional_head: bool = False, padding_idx: int | None = None):
        super().__init__()
        self.wte = nn.Embedding(30, 8, padding_idx=padding_idx)
        self.proj = nn.Linear(8, 8)
        self.functional_head = functional_head
        if not functional_head:
            self.lm_head = nn.Linear(8, 30, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        h = torch.tanh(self.proj(self.wte(idx)))
        return F.linear(h, self.wte.weight) if self.functional_head else self.lm_head(h)


def _reference(model, W, x):
    """The model computed by hand with weight W at both uses."""
    h = torch.tanh(model.proj(F.embedding(x, W, model.wte.padding_idx)))
    return F.linear(h, W)


@pytest.mark.parametrize("functional_head", [False, True])
@pytest.mark.parametrize("target", ["wte", "lm_head", "*"])
def test_tied_embedding_and_head_are_refused_on_request(functional_head, target):
    model = TiedLM(functional_head)
    if functional_head and target == "lm_head":
        target = "wte"  # the functional head is named after the weight it reads
    with pytest.raises(RuleError) as info:
        fxlora.rewrite(model, [Rule(target, r=2, alpha=2)], tied="refuse")
    msg = str(info.value)
    assert "tied or shared" in msg and "Untie" in msg and "tied='refuse'" in msg
    assert ("lm_head" in msg or "linear" in msg) and "wte" in msg


@pytest.mark.parametrize("functional_head", [False, True])
@pytest.mark.parametrize("target", ["wte", "lm_head", nn.Embedding])
def test_a_rule_over_one_use_adapts_the_tied_weight_at_every_use(functional_head, target):
    torch.manual_seed(0)
    model = TiedLM(functional_head, padding_idx=1)
    if functional_head and target == "lm_head":
        target = "wte"
    gm = fxlora.rewrite(model, [Rule(target, r=3, alpha=6)])
    (spec,) = fxlora.graph_sites(gm).values()  # one site for the weight, named after its first use
    assert spec.name == "wte" and spec.kind == "tied" and spec.weight_shape == (30, 8)
    assert set(fxlora.lora_state_dict(gm)) == {"wte.lora_A", "wte.lora_B"}  # one pair
    x = torch.randint(0, 30, (3, 7))
    x[0, 0] = 1  # the padding index
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # exact at init (B is zero)
    randomize_lora(gm, std=0.3)
    A, B = gm.get_parameter("wte.lora_A").detach(), gm.get_parameter("wte.lora_B").detach()
    W = model.wte.weight.detach() + B @ A * 2.0  # independent reference: one update for the weight
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _reference(model, W, x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(gm(x), model(x), atol=1e-3)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(x), _reference(model, W, x), atol=1e-5, rtol=1e-5)
    names = [n for n, _ in folded.named_parameters(remove_duplicate=False) if n.endswith("weight") and "proj" not in n]
    assert len({id(folded.get_parameter(n)) for n in names}) == 1  # still tied
    torch.testing.assert_close(folded.get_parameter("wte.weight"), W)
    assert op_sequence(folded) == op_sequence(torch.fx.symbolic_trace(model))
    # gradients reach the pair from both uses
    gm.train()
    gm(x).square().mean().backward()
    assert gm.get_parameter("wte.lora_A").grad.abs().sum() > 0 and gm.get_parameter("wte.lora_B").grad.abs().sum() > 0


def test_tied_weight_read_as_x_at_w_stored_in_out():
    """An embedding, and a head computing h @ E where E (vocab, dim) is read as (in, out)."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Parameter(torch.randn(12, 6))
            self.fc = nn.Linear(6, 12)

        def forward(self, idx):
            scores = self.fc(F.embedding(idx, self.emb))  # (.., 12)
            return scores @ self.emb  # the same weight, stored (in=12, out=6)

    torch.manual_seed(0)
    model = Mixed()
    gm = fxlora.rewrite(model, [Rule("emb", r=2, alpha=2)])
    (spec,) = fxlora.graph_sites(gm).values()
    uses = {u["kind"]: u for u in spec.op["uses"].values()}
    assert set(uses) == {"embedding", "linear"} and uses["linear"]["fan_in_fan_out"]
    randomize_lora(gm, std=0.3)
    W = model.emb.detach() + gm.get_parameter("emb_lora_B").detach() @ gm.get_parameter("emb_lora_A").detach()
    x = torch.randint(0, 12, (2, 5))
    with torch.no_grad():
        ref = model.fc(F.embedding(x, W)) @ W
        torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), ref, atol=1e-5, rtol=1e-5)


def test_a_weight_read_by_a_module_and_a_functional_call_is_one_site():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + F.linear(x, self.fc.weight)

    torch.manual_seed(0)
    model = TwoUses()
    with pytest.raises(RuleError, match="also read by"):
        fxlora.rewrite(model, [Rule("fc", r=1, alpha=1)], tied="refuse")
    gm = fxlora.rewrite(model, [Rule("fc", r=2, alpha=2, dropout=0.1)])
    (spec,) = fxlora.graph_sites(gm).values()
    assert spec.kind == "tied" and spec.dropout == 0.1  # linear uses only: the rule's dropout applies
    randomize_lora(gm)
    gm.eval()
    W = model.fc.weight + gm.get_parameter("fc.lora_B") @ gm.get_parameter("fc.lora_A")
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = F.linear(x, W, model.fc.bias) + F.linear(x, W)
        torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), ref, atol=1e-5, rtol=1e-5)


def test_a_tied_weight_with_a_use_fxlora_cannot_adapt_is_refused_in_either_mode():
    class Peeks(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)

        def forward(self, idx):
            return self.wte(idx) * self.wte.weight.sum()  # a use that is not a site

    for tied in ("adapt", "refuse"):
        with pytest.raises(RuleError, match=r"sum\(\.\.\.\)"):
            fxlora.rewrite(Peeks(), [Rule("wte", r=1, alpha=1)], tied=tied)


def test_tied_mode_is_checked():
    with pytest.raises(ArgumentError, match="tied must be one of 'adapt', 'refuse'"):
        fxlora.rewrite(TiedLM(), [Rule("wte", r=1, alpha=1)], tied="yes")
    with pytest.raises(ArgumentError, match="tied must be one of"):
        fxlora.plan(TiedLM(), [Rule("wte", r=1, alpha=1)], tied=None)
    with pytest.raises(RuleError, match="enable_lora does not apply to a tied weight"):
        fxlora.rewrite(TiedLM(), [Rule("lm_head", r=1, alpha=1, enable_lora=[True, False])])


def test_untied_model_adapts_both_and_folds_each_once():
    model = TiedLM()
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())  # untie
    gm = fxlora.rewrite(model, [Rule("wte", r=2, alpha=2), Rule("lm_head", r=2, alpha=2)])
    assert {s.kind for s in fxlora.graph_sites(gm).values()} == {"embedding", "linear"}
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


def test_reading_a_weights_shape_or_dtype_is_not_a_second_use():
    class Peeks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype)) * self.fc.weight.shape[0] + self.fc.weight.size(1)

    model = Peeks()
    gm = fxlora.rewrite(model, [Rule("fc", r=1, alpha=1)], tied="refuse")
    assert fxlora.graph_sites(gm)["fc"].kind == "linear"
    randomize_lora(gm)
    x = torch.randn(2, 4)
    torch.testing.assert_close(fxlora.fold(gm)(x), gm(x), atol=1e-5, rtol=1e-5)
