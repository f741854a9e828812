"""The fold pass and fxlora.fold: the base graph with merged weights, computed once in fp32."""

from __future__ import annotations

import fxlora
import pytest
import torch
from fxlora import FoldError
from torch import nn

from helpers import CASES, Functional, TinyTransformer, build_case, op_sequence, randomize_lora


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_equals_unmerged_and_restores_the_base_graph(case):
    model, x, rules = build_case(case)
    gm = fxlora.rewrite(model, rules)
    randomize_lora(gm)
    gm.eval()
    unmerged = gm(*x)
    assert not torch.allclose(unmerged, model(*x), atol=1e-4)

    folded = fxlora.fold(gm)
    folded.graph.lint()
    torch.testing.assert_close(folded(*x), unmerged, atol=1e-5, rtol=1e-5)
    base_graph = torch.fx.symbolic_trace(model)
    assert len(folded.graph.nodes) == len(base_graph.graph.nodes)
    assert op_sequence(folded) == op_sequence(base_graph)
    assert list(folded.state_dict()) == list(base_graph.state_dict())
    assert not any("lora" in name for name, _ in folded.named_modules())
    fresh = type(model)()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(*x), unmerged, atol=1e-5, rtol=1e-5)


def test_fold_never_touches_the_rewritten_module():
    torch.manual_seed(0)  # small enough that 1000 folds are cheap: a module called twice, functional and x @ W sites
    model = Functional()
    x = (torch.randn(2, 3, 8),)
    gm = fxlora.rewrite(model, [fxlora.Rule("*", r=2, alpha=4)])
    randomize_lora(gm)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    out = gm(*x)
    for _ in range(1000):
        folded = fxlora.fold(gm)
    after = gm.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before), "fold wrote into gm"
    assert torch.equal(gm(*x), out)
    assert folded is not gm


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fold_of_low_precision_weights_computes_in_fp32_and_rounds_once(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype)
    gm = fxlora.rewrite(model, [fxlora.Rule("*", r=4, alpha=8)])
    randomize_lora(gm, std=0.05)
    folded = fxlora.fold(gm)
    for i in ("0", "2"):
        W, A, B = (gm.get_parameter(f"{i}.{n}") for n in ("weight", "lora_A", "lora_B"))
        expected = (W.float() + (B.float() @ A.float()) * 2.0).to(dtype)
        got = folded.get_parameter(f"{i}.weight")
        assert got.dtype == dtype
        assert torch.equal(got, expected)
    # the folded low-precision model computes what the fp32 model with the same update computes, to the
    # dtype's precision
    x = torch.randn(4, 64).to(dtype)
    fp32 = fxlora.rewrite(model.float(), [fxlora.Rule("*", r=4, alpha=8)])
    fxlora.load_lora_state_dict(fp32, {k: v.float() for k, v in fxlora.lora_state_dict(gm).items()})
    out = folded(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), fxlora.fold(fp32)(x.float()), atol=0.05, rtol=0.05)


def test_fold_output_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=2, alpha=2)])
    randomize_lora(gm)
    folded = fxlora.fold(gm, dtype=torch.bfloat16)
    assert {p.dtype for p in folded.parameters()} == {torch.bfloat16}
    W, A, B = (gm.get_parameter(f"0.{n}") for n in ("weight", "lora_A", "lora_B"))
    assert torch.equal(folded.get_parameter("0.weight"), (W + B @ A).to(torch.bfloat16))
    assert gm.get_parameter("0.weight").dtype == torch.float32


def _gm():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [fxlora.Rule("blocks.*.qkv", r=2, alpha=2), fxlora.Rule("head", r=2, alpha=2)])
    randomize_lora(gm)
    return gm


def test_non_finite_adapter_is_refused_at_fold():
    gm = _gm()
    with torch.no_grad():
        gm.get_parameter("blocks.1.qkv.lora_B")[0, 0] = float("nan")
    with pytest.raises(FoldError, match="blocks.1.qkv"):
        fxlora.fold(gm)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_non_finite_merged_weight_is_refused(value, dtype):
    # the check reads the smallest and largest merged elements (aminmax): +inf, -inf and NaN anywhere are seen
    gm = _gm().to(dtype)
    with torch.no_grad():
        gm.get_parameter("blocks.0.qkv.weight")[3, 5] = value  # a base weight: the merged one holds it too
    with pytest.raises(FoldError, match="blocks.0.qkv"):
        fxlora.fold(gm)
