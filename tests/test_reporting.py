"""fxlora.report: per-site rows, totals, the LoRA paper's counts, meta-device models, fold fidelity."""

from __future__ import annotations

import json

import fxlora
import pytest
import torch
from fxlora import zoo
from torch import nn

from helpers import TinyTransformer


@pytest.mark.parametrize("name", sorted(zoo.PAPER))
def test_paper_trainable_parameter_counts(name):
    cfg = zoo.PAPER[name]
    with torch.device("meta"):
        model = cfg.factory()
    rep = fxlora.report(model, list(cfg.rules))
    assert rep.lora_params == cfg.lora_params  # the paper's count, as fxlora.zoo records it
    # ...and the same count from the paper's architecture table, independently of fxlora and its zoo:
    # a (d_in x d_out) site of rank r has r * (d_in + d_out) parameters; GPT-2's c_attn adapts the q and v
    # thirds of a d -> 3d projection (A: 2r x d, B: 2d x r), the encoders a d -> d query and value.
    layers, d, r, kind = {
        "roberta-base": (12, 768, 8, "qv"),
        "roberta-large": (24, 1024, 8, "qv"),
        "deberta-v2-xxlarge": (48, 1536, 16, "qv"),
        "gpt2-medium": (24, 1024, 4, "c_attn"),
        "gpt2-large": (36, 1280, 4, "c_attn"),
        "gpt3-175b-r1": (96, 12288, 1, "c_attn"),
        "gpt3-175b-r4": (96, 12288, 4, "c_attn"),
        "gpt3-175b-r8": (96, 12288, 8, "c_attn"),
    }[name]
    expected = layers * (2 * r * (d + d) if kind == "qv" else 2 * r * d + 2 * d * r)
    assert rep.lora_params == expected
    # the same numbers from an actual rewrite, on meta (no weight memory, even for GPT-3 175B)
    if "gpt3" not in name:
        gm = fxlora.rewrite(model, list(cfg.rules))
        assert sum(t.numel() for t in fxlora.lora_state_dict(gm).values()) == expected


def test_gpt2_medium_fused_rows_show_rank_per_slice():
    with torch.device("meta"):
        model = zoo.gpt2_medium()
    rep = fxlora.report(model, list(zoo.PAPER["gpt2-medium"].rules))
    row = rep.rows[0]
    assert row.name == "transformer.h.0.attn.c_attn" and row.kind == "linear"
    assert row.weight_shape == (1024, 3072) and row.enable_lora == (True, False, True)
    assert row.r == 4 and row.rank_text == "4 x 2 slices" and row.mask_text == "T-T"
    assert row.lora_params == 4 * 2 * 1024 + 2 * 1024 * 4
    assert row.base_params == 1024 * 3072 + 3072
    assert len(rep.rows) == 24
    table = rep.render("table")
    assert "4 x 2 slices" in table and "T-T" in table and "393,216" in table


def test_totals_and_bytes():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=40, d=16, n_layers=2)
    rep = fxlora.report(model, [fxlora.Rule("blocks.*.proj", r=2, alpha=4)])
    base = sum(p.numel() for p in model.parameters())
    lora = 2 * (2 * 16 + 16 * 2)
    assert rep.base_params == base and rep.lora_params == lora
    assert rep.trainable_percent == pytest.approx(100 * lora / (base + lora))
    assert rep.lora_bytes_fp32 == 4 * lora and rep.lora_bytes_bf16 == 2 * lora
    assert rep.model_bytes == 4 * base
    assert [r.name for r in rep.rows] == ["blocks.0.proj", "blocks.1.proj"]
    assert all(r.rule == "blocks.*.proj" and r.alpha == 4 for r in rep.rows)


def test_no_rules_lists_every_candidate_site():
    model = TinyTransformer()
    rep = fxlora.report(model)
    assert not rep.adapted and rep.lora_params == 0
    assert {(r.name, r.kind, r.weight_shape) for r in rep.rows} == {
        ("emb", "embedding", (40, 16)),
        ("blocks.0.qkv", "linear", (48, 16)),
        ("blocks.0.proj", "linear", (16, 16)),
        ("blocks.1.qkv", "linear", (48, 16)),
        ("blocks.1.proj", "linear", (16, 16)),
        ("head", "linear", (40, 16)),
    }
    assert "Write rules" in rep.render()


def test_formats_render_the_same_rows():
    rep = fxlora.report(TinyTransformer(), [fxlora.Rule("blocks.*.qkv", r=2, alpha=2, enable_lora=[True, False, True])])
    data = json.loads(rep.render("json"))
    assert [s["name"] for s in data["sites"]] == ["blocks.0.qkv", "blocks.1.qkv"]
    assert data["sites"][0]["enable_lora"] == [True, False, True]
    assert data["totals"]["lora_params"] == rep.lora_params
    md = rep.render("markdown")
    assert md.startswith("| site") and "|---" in md.replace(" ", "").replace(":", "-")
    csv_text = rep.render("csv").splitlines()
    assert csv_text[0].startswith("site,kind,weight") and len(csv_text) == 3
    with pytest.raises(fxlora.FxLoraError, match="format must be one of"):
        rep.render("html")


def test_gpt3_r4_checkpoint_is_the_papers_35mb():
    with torch.device("meta"):
        model = zoo.gpt3_175b()
    rep = fxlora.report(model, list(zoo.PAPER["gpt3-175b-r4"].rules))
    assert rep.lora_bytes_bf16 == 37_748_736  # 36 MiB; the paper: "from 350GB to 35MB"
    assert 9_000 < rep.model_bytes / 2 / rep.lora_bytes_bf16 < 10_000  # fp16 model vs adapter: ~10,000x


def test_report_of_a_meta_model_larger_than_memory():
    with torch.device("meta"):
        model = zoo.gpt3_175b()
    rep = fxlora.report(model, list(zoo.PAPER["gpt3-175b-r8"].rules))
    assert rep.base_params > 174_000_000_000
    assert rep.model_bytes > 600 * 1024**3


def test_report_of_a_rewritten_module_reports_its_sites():
    gm = fxlora.rewrite(TinyTransformer(), [fxlora.Rule("head", r=4, alpha=8)])
    rep = fxlora.report(gm)
    assert [r.name for r in rep.rows] == ["head"] and rep.lora_params == 4 * 16 + 40 * 4
    assert rep.base_params == sum(p.numel() for p in TinyTransformer().parameters())


def test_fold_fidelity_in_bf16():
    """bf16 weights of std 0.02 with |dW| around 1e-4: a large part of the update is rounded away."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.normal_(0, 0.02)
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=8, alpha=8)])
    with torch.no_grad():  # B @ A with entries ~1e-4
        gm.get_parameter("0.lora_A").copy_(torch.randn(8, 256) * 0.01)
        gm.get_parameter("0.lora_B").copy_(torch.randn(256, 8) * (1e-4 / (0.01 * 8**0.5)))
    rep = fxlora.report(gm, fidelity=torch.bfloat16)
    row = rep.rows[0]
    W = gm.get_parameter("0.weight").detach().float()
    ref = gm.get_parameter("0.lora_B").detach().float() @ gm.get_parameter("0.lora_A").detach().float()
    eff = (W + ref).to(torch.bfloat16).float() - W
    assert row.erased == pytest.approx(float(((eff == 0) & (ref != 0)).float().mean()))
    assert row.rel_error == pytest.approx(float((eff - ref).norm() / ref.norm()), rel=1e-5)
    assert 0.1 < row.erased < 0.6 and 0.15 < row.rel_error < 0.8
    # the same update on fp32 weights: nothing of it is lost
    fp32_gm = fxlora.rewrite(model.float(), [fxlora.Rule("0", r=8, alpha=8)])
    fxlora.load_lora_state_dict(fp32_gm, {k: v.float() for k, v in fxlora.lora_state_dict(gm).items()})
    fp32 = fxlora.report(fp32_gm, fidelity=torch.float32).rows[0]
    assert fp32.erased < 1e-3 and fp32.rel_error < 1e-3 and fp32.rel_error < row.rel_error / 100
    assert "erased in bfloat16" in rep.render()


def test_fidelity_of_an_update_below_half_an_ulp_is_total_loss():
    model = nn.Sequential(nn.Linear(4, 4, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # bf16 ulp at 1.0 is 2**-7
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=1, alpha=1)])
    with torch.no_grad():
        gm.get_parameter("0.lora_A").fill_(1.0)
        gm.get_parameter("0.lora_B").fill_(2.0**-10)
    row = fxlora.report(gm, fidelity=torch.bfloat16).rows[0]
    assert row.erased == 1.0 and row.rel_error == pytest.approx(1.0)
    assert torch.equal(fxlora.fold(gm).get_parameter("0.weight"), model[0].weight)


def test_fidelity_needs_a_rewritten_module():
    with pytest.raises(fxlora.NotRewrittenError, match=r"report\(..., fidelity=...\) expects the graph module returned"):
        fxlora.report(TinyTransformer(), [fxlora.Rule("head", r=1, alpha=1)], fidelity=torch.bfloat16)


def test_report_plans_with_the_same_options_as_rewrite():
    torch.manual_seed(0)
    model = zoo.gpt2_tiny()
    rules = [fxlora.Rule("lm_head", r=2, alpha=2)]
    tied = fxlora.report(model, rules)
    assert [r.name for r in tied.rows] == [r for r in fxlora.graph_sites(fxlora.rewrite(model, rules))]
    with pytest.raises(fxlora.RuleError, match="tied"):  # as rewrite(..., tied="refuse") does
        fxlora.report(model, rules, tied="refuse")
    with pytest.raises(fxlora.RuleError, match="tied"):
        fxlora.rewrite(model, rules, tied="refuse")
    with pytest.raises(fxlora.ArgumentError, match="adapter name"):
        fxlora.report(model, rules, adapter="")


def test_report_of_a_rewritten_module_reports_the_adapter_asked_for():
    gm = fxlora.rewrite(TinyTransformer(), [fxlora.Rule("blocks.*.qkv", r=2, alpha=2)], adapter="a")
    fxlora.add_adapter(gm, [fxlora.Rule("head", r=3, alpha=3)], "b")
    assert [r.name for r in fxlora.report(gm).rows] == ["blocks.0.qkv", "blocks.1.qkv"]  # the active one
    assert [r.name for r in fxlora.report(gm, adapter="b").rows] == ["head"]
    with pytest.raises(fxlora.ArgumentError, match="no adapter named 'z'"):
        fxlora.report(gm, adapter="z")
    for kwargs in ({"tied": "refuse"}, {"capture": "export"}, {"example_inputs": (torch.zeros(1),)}):
        with pytest.raises(fxlora.ArgumentError, match="already rewritten"):
            fxlora.report(gm, **kwargs)
