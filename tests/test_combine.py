"""fxlora.combine: combine_adapters against PEFT's add_weighted_adapter (the oracle), on the same factors."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
from fxlora.lora import delta_weight
from torch import nn

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 16)
        self.proj = nn.Linear(16, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, idx):
        h = self.emb(idx)
        h = torch.tanh(self.q(h)) + self.v(h)
        return self.conv(self.proj(h).transpose(1, 2)).transpose(1, 2)


def _pair(rank_b: int, conv: bool = True):
    """PEFT and fxlora holding the same two adapters a (q, v, emb, conv) and b (q, proj, emb, conv)."""
    torch.manual_seed(0)
    base = Net()
    targets_a, targets_b = ["q", "v", "emb"], ["q", "proj", "emb"]
    if conv:
        targets_a, targets_b = targets_a + ["conv"], targets_b + ["conv"]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets_a), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=rank_b, lora_alpha=3, target_modules=targets_b))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    gm = fxlora.rewrite(base, [fxlora.Rule(t, r=4, alpha=8) for t in targets_a], adapter="a")
    fxlora.add_adapter(gm, [fxlora.Rule(t, r=rank_b, alpha=3) for t in targets_b], "b")
    layers = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for adapter in ("a", "b"):
            for site, spec in fxlora.graph_sites(gm, adapter).items():
                layer = layers[site]
                a, b = ((layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]) if site == "emb"
                        else (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight))
                gm.get_parameter(spec.lora_A).copy_(a)
                gm.get_parameter(spec.lora_B).copy_(b)
    return pm, gm, layers


def _check_equal_deltas(pm, gm, layers, name):
    sites = fxlora.graph_sites(gm, name)
    assert set(sites) == set(fxlora.graph_sites(gm, "a")) | set(fxlora.graph_sites(gm, "b"))  # the union
    for site, spec in sites.items():
        ours = delta_weight(gm.get_parameter(spec.lora_A), gm.get_parameter(spec.lora_B), spec)
        theirs = layers[site].get_delta_weight(name)
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), atol=1e-5, rtol=1e-4, msg=site)


@pytest.mark.parametrize("method, rank_b, kwargs", [
    ("linear", 4, {}),
    ("cat", 2, {}),
    ("svd", 2, {}),
    ("svd", 4, {"svd_rank": 3}),
    ("ties", 4, {"density": 0.5}),
    ("ties", 4, {"density": 0.7, "majority_sign_method": "frequency"}),
])
def test_combination_equals_peft(method, rank_b, kwargs):
    pm, gm, layers = _pair(rank_b, conv=method != "svd")  # PEFT's svd merge fails on Conv1d (it handles Conv2d)
    weights = {"a": 0.7, "b": -0.4}
    peft_kwargs = {k: v for k, v in kwargs.items()}
    pm.add_weighted_adapter(["a", "b"], list(weights.values()), "mix", combination_type=method, **peft_kwargs)
    fxlora.combine_adapters(gm, weights, "mix", method, **kwargs)
    assert "mix" in fxlora.adapters(gm) and fxlora.active_adapters(gm) == ["a"]  # added, not active
    _check_equal_deltas(pm, gm, layers, "mix")
    # and the combined adapter computes what PEFT's does
    fxlora.set_adapter(gm, "mix")
    pm.set_adapter("mix")
    idx = torch.randint(0, 20, (2, 5))
    torch.testing.assert_close(gm(idx), pm(idx), atol=1e-4, rtol=1e-4)


def test_cat_and_svd_at_full_rank_are_the_exact_weighted_sum():
    _, gm, _ = _pair(2)
    fxlora.combine_adapters(gm, {"a": 0.7, "b": -0.4}, "cat", "cat")
    fxlora.combine_adapters(gm, {"a": 0.7, "b": -0.4}, "svd", "svd", svd_rank=6)
    idx = torch.randint(0, 20, (2, 5))
    exact = fxlora.fold(gm, adapters={"a": 0.7, "b": -0.4})(idx)
    for name in ("cat", "svd"):
        torch.testing.assert_close(fxlora.fold(gm, adapters={name: 1.0})(idx), exact, atol=1e-4, rtol=1e-4)


def test_dare_is_seeded_and_its_expectation_is_the_linear_merge():
    _, gm, _ = _pair(4)
    weights = {"a": 0.7, "b": 0.5}
    fxlora.combine_adapters(gm, weights, "lin", "linear")
    for i, seed in enumerate((3, 3, 4)):
        fxlora.combine_adapters(gm, weights, f"dare{i}", "dare_linear", density=0.5, seed=seed)
    p = gm.get_parameter
    assert torch.equal(p("q.lora_A_dare0"), p("q.lora_A_dare1"))  # same seed, same draw
    assert not torch.equal(p("q.lora_A_dare0"), p("q.lora_A_dare2"))
    # E[dare_linear] = linear: average many draws
    draws = []
    for seed in range(300):
        fxlora.combine_adapters(gm, weights, "tmp", "dare_linear", density=0.5, seed=seed)
        draws.append(p("q.lora_A_tmp").detach().clone())
        fxlora.delete_adapter(gm, "tmp")
    mean = torch.stack(draws).mean(0)
    linear = p("q.lora_A_lin").detach()
    assert (mean - linear).abs().max() < 0.2 * linear.abs().max()
    # at density 1 nothing is dropped: dare is linear, dare_ties is ties
    fxlora.combine_adapters(gm, weights, "d1", "dare_linear", density=1.0, seed=1)
    fxlora.combine_adapters(gm, weights, "t1", "ties", density=1.0)
    fxlora.combine_adapters(gm, weights, "dt1", "dare_ties", density=1.0, seed=1)
    assert torch.equal(p("q.lora_A_d1"), linear)
    assert torch.equal(p("q.lora_A_dt1"), p("q.lora_A_t1"))


def test_combinations_that_cannot_be_made_are_refused_and_change_nothing():
    _, gm, _ = _pair(2)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    with pytest.raises(fxlora.RuleError, match="different ranks there .*use 'cat' or 'svd'"):
        fxlora.combine_adapters(gm, {"a": 1.0, "b": 1.0}, "mix", "linear")
    with pytest.raises(fxlora.ArgumentError, match="no adapter named 'c'"):
        fxlora.combine_adapters(gm, {"a": 1.0, "c": 1.0}, "mix", "cat")
    with pytest.raises(fxlora.ArgumentError, match="already has an adapter named 'b'"):
        fxlora.combine_adapters(gm, {"a": 1.0}, "b", "cat")
    with pytest.raises(fxlora.ArgumentError, match="needs density in"):
        fxlora.combine_adapters(gm, {"a": 1.0, "b": 1.0}, "mix", "ties")
    with pytest.raises(fxlora.ArgumentError, match="method must be one of"):
        fxlora.combine_adapters(gm, {"a": 1.0, "b": 1.0}, "mix", "average")
    with pytest.raises(fxlora.ArgumentError, match="finite number"):
        fxlora.combine_adapters(gm, {"a": float("nan")}, "mix", "cat")
    assert fxlora.adapters(gm) == ["a", "b"] and gm.code == code
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_masked_sites_combine_with_their_own_kind_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12))
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=2, alpha=2, enable_lora=[True, False, True])], adapter="a")
    fxlora.add_adapter(gm, [fxlora.Rule("0", r=3, alpha=3, enable_lora=[True, False, True])], "b")
    fxlora.add_adapter(gm, [fxlora.Rule("0", r=2, alpha=2)], "c")
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm):
            gm.get_parameter(name).normal_()
    fxlora.combine_adapters(gm, {"a": 1.0, "b": 0.5}, "ab", "cat")  # same mask: rank 2 + 3 per slice
    assert fxlora.graph_sites(gm, "ab")["0"].enable_lora == (True, False, True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fxlora.fold(gm, adapters={"ab": 1.0})(x), fxlora.fold(gm, adapters={"a": 1.0, "b": 0.5})(x))
    with pytest.raises(fxlora.RuleError, match="different enable_lora masks"):
        fxlora.combine_adapters(gm, {"a": 1.0, "c": 1.0}, "ac", "cat")
    fxlora.combine_adapters(gm, {"a": 1.0, "c": 1.0}, "ac", "svd", svd_rank=12)  # the SVD of the sum is plain
    torch.testing.assert_close(fxlora.fold(gm, adapters={"ac": 1.0})(x), fxlora.fold(gm, adapters={"a": 1.0, "c": 1.0})(x),
                               atol=1e-5, rtol=1e-5)
