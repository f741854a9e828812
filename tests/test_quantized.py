"""fxlora.quantized: LoRA over quantized base weights (QLoRA) with torchao's NF4 and int8 weight-only
tensors: the branch in the compute dtype against a dense reference built from the dequantized weights,
PEFT's output with the same quantized weights and factors, training, memory, fold (dense, re-quantized,
another dtype), the fidelity of re-quantizing, and the errors."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import FoldError, Rule
from fxlora.quantized import dense, is_quantized, stored_bytes
from torch import nn

torchao = pytest.importorskip("torchao")
quantization = pytest.importorskip("torchao.quantization")

to_nf4 = getattr(quantization, "to_nf4", None)
if to_nf4 is None:  # older torchao
    to_nf4 = pytest.importorskip("torchao.dtypes").to_nf4

D = 256  # NF4 quantizes in blocks of 64 values and 256 scalers


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, 16)  # stays dense

    def forward(self, x):
        return self.head(x + self.down(F.gelu(self.up(x))))


def _nf4(model):
    for name in ("up", "down"):
        layer = getattr(model, name)
        layer.weight = nn.Parameter(to_nf4(layer.weight.detach()), requires_grad=False)
    return model


def _int8(model):
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in ("up", "down"))
    return model


QUANTIZE = {"nf4": _nf4, "int8": _int8}
RULES = [Rule("up", r=8, alpha=16), Rule("down", r=8, alpha=16)]


def _models(kind):
    torch.manual_seed(0)
    dense_model = MLP().to(torch.bfloat16)
    quantized = QUANTIZE[kind](copy.deepcopy(dense_model))
    gm = fxlora.rewrite(quantized, RULES, capture="symbolic")
    with torch.no_grad():  # non-zero B: the branch is live
        for name in fxlora.lora_parameter_names(gm):
            gm.get_parameter(name).normal_(0, 0.05)
    return quantized, gm


def _reference(quantized, gm, x):
    """The model in float32 from the dequantized weights, each site adding x A^T B^T * alpha/r."""
    out = {}
    for name in ("up", "down", "head"):
        layer = getattr(quantized, name)
        W = dense(layer.weight, name).float()
        if name != "head":
            spec = fxlora.graph_sites(gm)[name]
            W = W + spec.scale * gm.get_parameter(spec.lora_B).float() @ gm.get_parameter(spec.lora_A).float()
        out[name] = (W, None if layer.bias is None else layer.bias.float())
    h = F.linear(F.gelu(F.linear(x.float(), *out["up"])), *out["down"])
    return F.linear(x.float() + h, *out["head"])


def _close(got, ref, tol=3e-2):
    err = float(torch.linalg.vector_norm(got.float() - ref) / torch.linalg.vector_norm(ref))
    assert err < tol, err


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_branch_in_the_compute_dtype_equals_a_reference_from_the_dequantized_weights(kind):
    quantized, gm = _models(kind)
    for name in ("up", "down"):
        assert is_quantized(gm.get_parameter(f"{name}.weight"))  # the base stays quantized
        spec = fxlora.graph_sites(gm)[name]
        assert gm.get_parameter(spec.lora_A).dtype == gm.get_parameter(spec.lora_B).dtype == torch.bfloat16
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == set(fxlora.lora_parameter_names(gm))
    x = torch.randn(4, 7, D, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    ref = _reference(quantized, gm, x)
    _close(gm(x), ref)
    assert float(torch.linalg.vector_norm(quantized(x).float() - ref)) > 0.05 * float(torch.linalg.vector_norm(ref))


def test_peft_gives_the_same_output_over_the_same_nf4_weights():
    peft = pytest.importorskip("peft")
    quantized, gm = _models("nf4")
    pm = peft.get_peft_model(copy.deepcopy(quantized), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["up", "down"]))
    with torch.no_grad():
        for name in ("up", "down"):
            spec = fxlora.graph_sites(gm)[name]
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(gm.get_parameter(spec.lora_A))
            layer.lora_B["default"].weight.copy_(gm.get_parameter(spec.lora_B))
    pm = pm.to(torch.bfloat16)
    x = torch.randn(3, 5, D, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    _close(gm(x), pm(x).float(), tol=1e-2)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_trains_only_the_adapter_and_costs_the_quantized_bytes(kind):
    quantized, gm = _models(kind)
    before = {n: dense(gm.get_parameter(f"{n}.weight"), n).clone() for n in ("up", "down")}
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, D, dtype=torch.bfloat16, generator=g), torch.randint(0, 16, (8,), generator=g)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(gm(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, W in before.items():
        assert torch.equal(dense(gm.get_parameter(f"{n}.weight"), n), W)
    bf16_bytes = sum(p.numel() * 2 for p in quantized.parameters())
    ratio = fxlora.report(quantized).model_bytes / bf16_bytes
    assert ratio < {"nf4": 0.45, "int8": 0.65}[kind]  # the quantized layers dominate; the head stays bf16
    assert stored_bytes(quantized.up.weight) < quantized.up.weight.numel() * 2


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_fold_returns_dense_weights_in_the_compute_dtype_or_the_one_asked(kind):
    quantized, gm = _models(kind)
    x = torch.randn(2, 5, D, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(4))
    ref = _reference(quantized, gm, x)
    folded = fxlora.fold(gm)
    for name in ("up", "down"):
        W = folded.get_parameter(f"{name}.weight")
        assert not is_quantized(W) and W.dtype == torch.bfloat16
    _close(folded(x), ref)
    fp32 = fxlora.fold(gm, dtype=torch.float32)
    assert fp32.get_parameter("up.weight").dtype == fp32.get_parameter("head.weight").dtype == torch.float32
    _close(fp32(x.float()), ref, tol=1e-2)
    assert is_quantized(gm.get_parameter("up.weight"))  # gm is not modified


def test_fold_requantizes_on_request_and_the_report_says_what_it_loses():
    quantized, gm = _models("nf4")
    folded = fxlora.fold(gm, requantize=to_nf4)
    assert type(folded.get_parameter("up.weight")).__name__ == "NF4Tensor"
    x = torch.randn(2, 5, D, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(5))
    _close(folded(x), _reference(quantized, gm, x), tol=0.15)  # a 4-bit grid: coarse

    rep = fxlora.report(gm, fidelity=to_nf4)
    assert rep.fidelity_quantizer == "to_nf4" and "erased by to_nf4" in rep.render("markdown")
    rows = {row.name: row for row in rep.rows}
    for name in ("up", "down"):  # independently: what the folded weight applies, against the float32 update
        spec = fxlora.graph_sites(gm)[name]
        base = gm.get_parameter(f"{name}.weight").get_original_weight().float()
        delta = spec.scale * gm.get_parameter(spec.lora_B).float() @ gm.get_parameter(spec.lora_A).float()
        effective = folded.get_parameter(f"{name}.weight").get_original_weight().float() - base
        rel = float(torch.linalg.vector_norm(effective - delta) / torch.linalg.vector_norm(delta))
        assert rows[name].rel_error == pytest.approx(rel, rel=1e-3)
    bf16 = fxlora.report(gm, fidelity=torch.bfloat16)
    assert all(row.rel_error < rows[row.name].rel_error for row in bf16.rows)  # re-quantizing loses far more


def test_errors_name_the_weight_and_change_nothing():
    quantized, gm = _models("nf4")
    with pytest.raises(FoldError, match=r"requantize returned \(2,\) for the weight 'up.weight' of site 'up'"):
        fxlora.fold(gm, requantize=lambda w: torch.zeros(2))
    with pytest.raises(FoldError, match="requantize failed on the weight 'down.weight'.*RuntimeError: no"):
        fxlora.fold(gm, requantize=lambda w: (_ for _ in ()).throw(RuntimeError("no")) if w.shape[0] == D else to_nf4(w))
    with pytest.raises(fxlora.ArgumentError, match="requantize"):
        fxlora.fold(gm, requantize="nf4")
    with pytest.raises(fxlora.ArgumentError, match="fidelity must be a torch.dtype or a quantizing function"):
        fxlora.report(gm, fidelity="bf16")

    class Opaque(type(gm.get_parameter("up.weight"))):  # a quantized type without a way to dequantize
        get_original_weight = None
        dequantize = None

    weight = gm.get_parameter("up.weight")
    weight.__class__ = Opaque
    try:
        with pytest.raises(FoldError, match=r"'up.weight' of site 'up' is a Opaque, which fxlora cannot dequantize"):
            fxlora.fold(gm)
    finally:
        weight.__class__ = Opaque.__mro__[1]
    assert is_quantized(gm.get_parameter("up.weight")) and fxlora.graph_sites(gm)  # unchanged, still rewritten

    x = torch.randn(2, D, dtype=torch.bfloat16)
    with pytest.raises(fxlora.RuleError, match="quantized NF4Tensor, which torch.export flattens.*capture='symbolic'"):
        fxlora.rewrite(quantized, RULES, capture="export", example_inputs=(x,))
