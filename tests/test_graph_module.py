"""merge_on_eval: eval runs the folded model, train returns to the branches, no weight ever drifts."""

from __future__ import annotations

import fxlora
import loralib
import torch
from torch import nn

from helpers import TinyTransformer, randomize_lora

RULES = [fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]), fxlora.Rule("head", r=2, alpha=4)]


def _gm(merge_on_eval=True):
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), RULES, merge_on_eval=merge_on_eval)
    randomize_lora(gm)
    return gm


def test_eval_output_equals_fold_and_runs_the_folded_graph():
    gm = _gm()
    x = torch.randint(0, 40, (2, 6))
    gm.eval()
    expected = fxlora.fold(gm)(x)
    assert torch.equal(gm(x), expected)
    merged = gm.merged_module()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert len(merged.graph.nodes) == len(torch.fx.symbolic_trace(TinyTransformer()).graph.nodes)
    gm.train()
    torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
    assert gm.__dict__["_fxlora_cache"] is None  # the merged copy is freed on train()


def test_off_keeps_the_branches_in_eval():
    gm = _gm(merge_on_eval=False)
    gm.eval()
    x = torch.randint(0, 40, (2, 6))
    gm(x)
    assert gm.__dict__["_fxlora_cache"] is None


def test_1000_toggles_leave_every_weight_bit_identical():
    # a model small enough that 1000 refolds are cheap; the drift loralib shows needs no more (see below)
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    gm = fxlora.rewrite(tiny, [fxlora.Rule("0", r=2, alpha=4), fxlora.Rule("2", r=2, alpha=3)], merge_on_eval=True)
    randomize_lora(gm)
    x = torch.randn(3, 8)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    for _ in range(1000):
        gm.eval()
        gm(x)
        gm.train()
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loralib_drifts_where_fxlora_does_not():
    """The baseline this feature fixes: loralib's merge/unmerge changes weight.data."""
    torch.manual_seed(0)
    layer = loralib.Linear(256, 256, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = layer.weight.detach().clone()
    layer.eval()
    layer.train()
    changed = (layer.weight != w0).float().mean().item()
    assert changed > 0.0  # loralib: a fraction of elements off by an ulp after one toggle


def test_cache_follows_changes_to_lora_tensors():
    gm = _gm()
    x = torch.randint(0, 40, (2, 6))
    gm.eval()
    first = gm(x)
    with torch.no_grad():
        gm.get_parameter("head.lora_B").mul_(3.0)  # an in-place change while in eval mode
    second = gm(x)
    assert not torch.allclose(first, second)
    assert torch.equal(second, fxlora.fold(gm)(x))
    fxlora.load_lora_state_dict(gm, {k: torch.zeros_like(v) for k, v in fxlora.lora_state_dict(gm).items()})
    torch.testing.assert_close(gm(x), fxlora.fold(gm)(x))


def test_a_training_step_after_eval_still_trains():
    gm = _gm()
    x = torch.randint(0, 40, (4, 6))
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    gm.eval()
    with torch.no_grad():
        gm(x)
    gm.train()
    before = gm.get_parameter("head.lora_B").detach().clone()
    loss = nn.functional.cross_entropy(gm(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert gm.get_parameter("head.lora_B").grad is not None
    opt.step()
    assert not torch.equal(before, gm.get_parameter("head.lora_B"))
    gm.eval()
    assert torch.equal(gm(x), fxlora.fold(gm)(x))  # the refreshed cache sees the step


def test_deepcopy_keeps_merge_on_eval():
    import copy

    gm = _gm()
    clone = copy.deepcopy(gm)
    assert isinstance(clone, fxlora.LoraGraphModule) and clone.merge_on_eval
    x = torch.randint(0, 40, (2, 6))
    clone.eval()
    gm.eval()
    assert torch.equal(clone(x), gm(x))
