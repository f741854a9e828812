"""The rewrite pass: the base function at init, one branch per module, provenance, live dropout."""

from __future__ import annotations

import fxlora
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import CASES, TinyTransformer, build_case, count_calls, randomize_lora


@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_at_init_computes_the_base_function(case):
    model, x, rules = build_case(case)
    gm = fxlora.rewrite(model, rules)
    gm.graph.lint()
    assert fxlora.graph_sites(gm)
    assert torch.equal(gm(*x), model(*x))


def test_a_module_called_twice_gets_one_branch_and_one_delta():
    model, x, _ = build_case("functional")
    gm = fxlora.rewrite(model, [fxlora.Rule("fc", r=2, alpha=2)])
    assert sorted(fxlora.lora_state_dict(gm)) == ["fc.lora_A", "fc.lora_B"]
    assert sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == "fc.lora_A") == 2
    randomize_lora(gm)
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(*x), gm(*x), atol=1e-5, rtol=1e-5)


def test_graph_records_provenance():
    model, _, rules = build_case("transformer")
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


def test_meta_device_models_rewrite_and_fold():
    with torch.device("meta"):
        model = TinyTransformer(vocab=1000, d=256, n_layers=4)
    gm = fxlora.rewrite(model, [fxlora.Rule("blocks.*.qkv", r=8, alpha=16, enable_lora=[True, False, True])])
    shapes = {k: tuple(v.shape) for k, v in fxlora.lora_state_dict(gm).items()}
    assert shapes["blocks.3.qkv.lora_A"] == (16, 256) and shapes["blocks.3.qkv.lora_B"] == (512, 8)
    assert all(p.device.type == "meta" for p in fxlora.fold(gm).parameters())


def test_dropout_is_live_in_train_and_off_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=4, alpha=4, dropout=0.5)])
    randomize_lora(gm)
    x = torch.randn(16, 32)
    gm.train()
    a, b = gm(x), gm(x)
    assert not torch.allclose(a, b)
    gm.eval()
    c, d = gm(x), gm(x)
    assert torch.equal(c, d)
    no_dropout = fxlora.rewrite(model, [fxlora.Rule("0", r=4, alpha=4)])
    fxlora.load_lora_state_dict(no_dropout, fxlora.lora_state_dict(gm))
    torch.testing.assert_close(c, no_dropout(x))
    assert gm.get_submodule("0.lora_dropout").p == 0.5
