"""Rewrite and fold on symbolically traced models: function, graph structure, state dicts, no copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxlora
from helpers import ConvNet, Functional, TinyTransformer, count_calls, op_sequence, randomize_lora

CASES = {
    "transformer": (
        TinyTransformer,
        lambda: (torch.randint(0, 40, (2, 6)),),
        [
            fxlora.Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]),
            fxlora.Rule("re:blocks\\.\\d+\\.proj", r=3, alpha=3),
            fxlora.Rule(nn.Embedding, r=4, alpha=8),
            fxlora.Rule("head", r=2, alpha=2),
        ],
    ),
    "convnet": (ConvNet, lambda: (torch.randn(2, 3, 11, 11),), [fxlora.Rule("c*", r=2, alpha=4), fxlora.Rule("fc", r=1, alpha=1)]),
    "functional": (Functional, lambda: (torch.randn(3, 5, 8),), [fxlora.Rule("*", r=2, alpha=4)]),
}


def _build(case):
    factory, inputs, rules = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    return model, inputs(), rules


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_at_init_computes_the_base_function(case):
    model, x, rules = _build(case)
    gm = fxlora.rewrite(model, rules)
    gm.graph.lint()
    assert fxlora.graph_sites(gm)
    assert torch.equal(gm(*x), model(*x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_equals_unmerged_and_restores_the_base_graph(case):
    model, x, rules = _build(case)
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
    model, x, rules = _build("transformer")
    gm = fxlora.rewrite(model, rules)
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


def test_rewrite_leaves_the_input_model_unchanged_and_copies_no_weight():
    model, x, rules = _build("transformer")
    model.blocks[1].ln.weight.requires_grad_(False)  # a flag rewrite must preserve
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    out = model(*x)
    modules = dict(model.named_modules())

    gm = fxlora.rewrite(model, rules, bias="all")
    randomize_lora(gm)
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    gm.train()
    gm(*x).square().mean().backward()
    opt.step()

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[k] is m for k, m in model.named_modules())
    assert torch.equal(model(*x), out)

    # Base weights are shared (same storage), not copied: the added memory is the LoRA parameters
    # (and, here, the biases that bias="all" trains, which get storage of their own).
    base_ptrs = {p.data_ptr() for p in model.parameters()}
    lora = set(fxlora.lora_parameter_names(gm))
    added = 0
    for name, p in gm.named_parameters():
        if name in lora:
            added += p.numel()
            continue
        if name.endswith(".bias"):
            assert p.data_ptr() not in base_ptrs
            continue
        assert p.data_ptr() in base_ptrs, name
    assert added == sum(gm.get_parameter(n).numel() for n in lora)


def test_a_module_called_twice_gets_one_branch_and_one_delta():
    model, x, _ = _build("functional")
    gm = fxlora.rewrite(model, [fxlora.Rule("fc", r=2, alpha=2)])
    assert sorted(fxlora.lora_state_dict(gm)) == ["fc.lora_A", "fc.lora_B"]
    assert sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc.lora_A") == 2
    randomize_lora(gm)
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(*x), gm(*x), atol=1e-5, rtol=1e-5)


def test_functional_sites_read_layout_from_the_graph():
    model, x, _ = _build("functional")
    gm = fxlora.rewrite(model, [fxlora.Rule("proj", r=2, alpha=2), fxlora.Rule("w2", r=2, alpha=2), fxlora.Rule("w1", r=2, alpha=2)])
    sites = fxlora.graph_sites(gm)
    assert sites["proj"].fan_in_fan_out and sites["w2"].fan_in_fan_out and not sites["w1"].fan_in_fan_out
    state = fxlora.lora_state_dict(gm)
    assert state["proj.lora_A"].shape == (2, 12) and state["proj.lora_B"].shape == (8, 2)
    assert state["w1_lora_A"].shape == (2, 8) and state["w1_lora_B"].shape == (12, 2)


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
    x = torch.randn(4, 64).to(dtype)
    ref = fxlora.fold(fxlora.rewrite(model.float(), [fxlora.Rule("*", r=4, alpha=8)]))
    assert folded(x).dtype == dtype
    assert ref is not None


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


def test_graph_records_provenance():
    model, _, rules = _build("transformer")
    gm = fxlora.rewrite(model, rules)
    sites = fxlora.graph_sites(gm)
    assert sites["blocks.0.qkv"].rule == repr(rules[0]) and sites["blocks.0.qkv"].rule_index == 0
    assert sites["blocks.1.proj"].rule_index == 1 and sites["emb"].rule_index == 2
    roles = {n.meta["fxlora"]["role"] for n in gm.graph.nodes if "fxlora" in n.meta}
    assert roles == {"base", "lora_A", "lora_B", "shrink", "expand", "add"}
    for n in gm.graph.nodes:
        if n.meta.get("fxlora", {}).get("role") == "add":
            assert n.args[0].meta["fxlora"]["role"] == "base"
    assert count_calls(gm, F.linear) > 0


def test_precedence_exact_over_pattern_over_type():
    model, _, _ = _build("transformer")
    rules = [
        fxlora.Rule(nn.Linear, r=1, alpha=1),
        fxlora.Rule("blocks.*", r=2, alpha=2),
        fxlora.Rule("blocks.0.proj", r=3, alpha=3),
        fxlora.Rule("re:blocks\\.\\d\\.proj", r=4, alpha=4),
    ]
    sites = fxlora.graph_sites(fxlora.rewrite(model, rules))
    assert sites["blocks.0.proj"].r == 3  # exact name
    assert sites["blocks.1.proj"].r == 2  # first pattern listed
    assert sites["blocks.0.qkv"].r == 2
    assert sites["head"].r == 1  # type
    assert "emb" not in sites


def test_glob_does_not_match_a_longer_index():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    sites = fxlora.graph_sites(fxlora.rewrite(model, [fxlora.Rule("1", r=1, alpha=1)]))
    assert list(sites) == ["1"]
    sites = fxlora.graph_sites(fxlora.rewrite(model, [fxlora.Rule("re:1", r=1, alpha=1)]))
    assert list(sites) == ["1"]


def test_rewrite_accepts_a_graph_module_and_leaves_it_unchanged():
    model, x, rules = _build("transformer")
    traced = torch.fx.symbolic_trace(model)
    code = traced.code
    gm = fxlora.rewrite(traced, rules)
    assert traced.code == code and not any("fxlora" in n.meta for n in traced.graph.nodes)
    assert torch.equal(gm(*x), traced(*x))


def test_meta_device_models_rewrite_and_fold():
    with torch.device("meta"):
        model = TinyTransformer(vocab=1000, d=256, n_layers=4)
    gm = fxlora.rewrite(model, [fxlora.Rule("blocks.*.qkv", r=8, alpha=16, enable_lora=[True, False, True])])
    shapes = {k: tuple(v.shape) for k, v in fxlora.lora_state_dict(gm).items()}
    assert shapes["blocks.3.qkv.lora_A"] == (16, 256) and shapes["blocks.3.qkv.lora_B"] == (512, 8)
    assert all(p.device.type == "meta" for p in fxlora.fold(gm).parameters())
