"""fxlora.named_adapters: several adapters on one base, switched without re-capture, folded with weights."""

from __future__ import annotations

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule
from torch import nn

from helpers import TinyTransformer, op_sequence, randomize_lora

# Two adapters on overlapping (qkv of block 0) and disjoint sites, with different r and alpha.
RULES_A = [Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]), Rule("emb", r=3, alpha=3)]
RULES_B = [Rule("blocks.0.qkv", r=4, alpha=2), Rule("blocks.*.proj", r=3, alpha=6), Rule("head", r=2, alpha=8)]


def _two_adapters():
    torch.manual_seed(0)
    model = TinyTransformer()
    gm = fxlora.rewrite(model, RULES_A, adapter="a")
    fxlora.add_adapter(gm, RULES_B, "b")
    randomize_lora(gm, std=0.2)
    return model, gm


def _alone(model, gm, adapter, rules):
    """A model rewritten with ``adapter`` alone, holding the same factors."""
    single = fxlora.rewrite(model, rules)
    for site, spec in fxlora.graph_sites(gm, adapter).items():
        target = fxlora.graph_sites(single)[site]
        with torch.no_grad():
            single.get_parameter(target.lora_A).copy_(gm.get_parameter(spec.lora_A))
            single.get_parameter(target.lora_B).copy_(gm.get_parameter(spec.lora_B))
    return single


def _calls(gm, target=F.linear):
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def test_each_choice_equals_that_adapter_alone_and_none_is_the_base():
    model, gm = _two_adapters()
    x = torch.randint(0, 40, (3, 6))
    weights_before = {n: p.clone() for n, p in model.named_parameters()}
    base_graph = [(n.op, n.target) for n in gm.graph.nodes]
    assert fxlora.adapters(gm) == ["a", "b"] and fxlora.active_adapters(gm) == ["a"]  # added, not active
    expected = {"a": _alone(model, gm, "a", RULES_A)(x), "b": _alone(model, gm, "b", RULES_B)(x)}
    for choice in ("b", "a", ["a"], "b", None, "a"):
        fxlora.set_adapter(gm, choice)
        out = gm(x)
        if choice is None:
            assert torch.equal(out, model(x))  # the base model, exactly
        else:
            name = choice if isinstance(choice, str) else choice[0]
            torch.testing.assert_close(out, expected[name], atol=1e-5, rtol=1e-5)
    # several at once add up: at every site both updates, against a reference with both folded in
    fxlora.set_adapter(gm, ["a", "b"])
    torch.testing.assert_close(gm(x), fxlora.fold(gm)(x), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(p, weights_before[n]) for n, p in model.named_parameters())
    assert len(base_graph) > 0


def test_switching_touches_no_base_weight_retraces_nothing_and_inactive_adapters_cost_nothing(monkeypatch):
    model, gm = _two_adapters()
    base_ids = {n: (p.data_ptr(), p._version) for n, p in gm.named_parameters() if "lora" not in n}
    def no_capture(*args, **kwargs):
        raise AssertionError("switching adapters re-captured the model")

    monkeypatch.setattr("fxlora.tracing.trace", no_capture)
    monkeypatch.setattr("fxlora.tracing.export_capture", no_capture)
    x = torch.randint(0, 40, (2, 5))
    fxlora.set_adapter(gm, None)
    base_ops = op_sequence(gm)
    assert op_sequence(gm) == op_sequence(torch.fx.symbolic_trace(model)) and not any("fxlora" in n.meta and n.meta["fxlora"]["role"] != "base" for n in gm.graph.nodes)
    fxlora.set_adapter(gm, "a")
    # only adapter a's branches are in the graph: its 3 sites (2 qkv + emb) each get a shrink and an expand
    roles = [(n.meta["fxlora"]["adapter"], n.meta["fxlora"]["role"]) for n in gm.graph.nodes if "fxlora" in n.meta]
    assert {a for a, r in roles if r == "shrink"} == {"a"} and sum(r == "add" for _, r in roles) == 3
    assert not any("lora_A_b" in str(n.target) for n in gm.graph.nodes)  # b's factors are not even read
    fxlora.set_adapter(gm, "b")
    assert sum(1 for n in gm.graph.nodes if "fxlora" in n.meta and n.meta["fxlora"]["role"] == "add") == 4
    gm(x)
    fxlora.set_adapter(gm, None)
    assert op_sequence(gm) == base_ops
    assert {n: (p.data_ptr(), p._version) for n, p in gm.named_parameters() if "lora" not in n} == base_ids


def test_trainable_flags_follow_the_active_adapters():
    _, gm = _two_adapters()
    trainable = lambda: sorted(n for n, p in gm.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable() == sorted(n for n in fxlora.lora_parameter_names(gm) if not n.endswith("_b"))
    fxlora.set_adapter(gm, "b")
    assert all(n.endswith("_b") for n in trainable()) and len(trainable()) == 8
    fxlora.mark_only_lora_as_trainable(gm, bias="lora_only")
    fxlora.set_adapter(gm, ["a", "b"])  # the bias mode is kept
    assert "head.bias" in trainable() and "blocks.0.qkv.bias" in trainable()
    x = torch.randint(0, 40, (2, 5))
    gm(x).sum().backward()
    assert {n for n, p in gm.named_parameters() if p.grad is not None} == set(trainable())


def test_disable_adapter_runs_the_base_and_restores_what_was_active():
    model, gm = _two_adapters()
    fxlora.set_adapter(gm, ["b", "a"])
    x = torch.randint(0, 40, (2, 5))
    with fxlora.disable_adapter(gm):
        assert torch.equal(gm(x), model(x))
    assert fxlora.active_adapters(gm) == ["b", "a"]
    with pytest.raises(RuntimeError, match="inside"):
        with fxlora.disable_adapter(gm):
            raise RuntimeError("inside")
    assert fxlora.active_adapters(gm) == ["b", "a"]


def test_weighted_fold_equals_the_unmerged_model_with_those_weights_and_is_the_base_graph():
    model, gm = _two_adapters()
    x = torch.randint(0, 40, (2, 5))
    folded = fxlora.fold(gm, adapters={"a": 1.0, "b": 0.5})
    # the unmerged reference: both adapters active, b's B halved
    reference = _alone(model, gm, "a", RULES_A)
    fxlora.add_adapter(reference, RULES_B, "b")
    with torch.no_grad():
        for spec in fxlora.graph_sites(gm, "b").values():
            reference.get_parameter(spec.lora_A).copy_(gm.get_parameter(spec.lora_A))
            reference.get_parameter(spec.lora_B).copy_(gm.get_parameter(spec.lora_B) * 0.5)
    fxlora.set_adapter(reference, ["default", "b"])  # _alone made a as the default adapter
    torch.testing.assert_close(folded(x), reference(x), atol=1e-5, rtol=1e-5)
    assert op_sequence(folded) == op_sequence(torch.fx.symbolic_trace(model))
    assert set(folded.state_dict()) == set(model.state_dict())
    # the default folds the active adapters with weight 1
    torch.testing.assert_close(fxlora.fold(gm)(x), _alone(model, gm, "a", RULES_A)(x), atol=1e-5, rtol=1e-5)


def test_unload_and_delete():
    model, gm = _two_adapters()
    x = torch.randint(0, 40, (2, 5))
    base = fxlora.unload(gm)
    assert torch.equal(base(x), model(x)) and op_sequence(base) == op_sequence(torch.fx.symbolic_trace(model))
    assert not any("lora" in n for n in base.state_dict())
    fxlora.set_adapter(gm, ["a", "b"])
    fxlora.delete_adapter(gm, "a")  # an active adapter may go; the others stay active
    assert fxlora.adapters(gm) == ["b"] and fxlora.active_adapters(gm) == ["b"]
    assert not any(n.endswith(("lora_A", "lora_B")) for n in gm.state_dict())
    with pytest.raises(fxlora.ArgumentError, match="only adapter; fxlora.unload"):
        fxlora.delete_adapter(gm, "b")


def test_bad_adapter_names_and_calls_change_nothing():
    _, gm = _two_adapters()
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    cases = [
        (lambda: fxlora.set_adapter(gm, "c"), fxlora.ArgumentError, "no adapter named 'c'"),
        (lambda: fxlora.set_adapter(gm, ["a", "a"]), fxlora.ArgumentError, "named twice"),
        (lambda: fxlora.set_adapter(gm, 3), fxlora.ArgumentError, "takes an adapter name"),
        (lambda: fxlora.add_adapter(gm, RULES_B, "b"), fxlora.ArgumentError, "already has an adapter named 'b'"),
        (lambda: fxlora.add_adapter(gm, RULES_B, "bad-name"), fxlora.ArgumentError, "Python identifier"),
        (lambda: fxlora.add_adapter(gm, [Rule("nope", r=1, alpha=1)], "c"), fxlora.RuleError, "matched no module"),
        (lambda: fxlora.delete_adapter(gm, "c"), fxlora.ArgumentError, "no adapter named 'c'"),
        (lambda: fxlora.fold(gm, adapters={"c": 1.0}), fxlora.ArgumentError, "no adapter named 'c'"),
        (lambda: fxlora.fold(gm, adapters={"a": float("inf")}), fxlora.ArgumentError, "finite number"),
        (lambda: fxlora.rewrite(gm, RULES_A), fxlora.RuleError, "fxlora.add_adapter"),
    ]
    for call, error, text in cases:
        with pytest.raises(error, match=text):
            call()
    assert gm.code == code and fxlora.adapters(gm) == ["a", "b"]
    assert list(gm.state_dict()) == list(state) and all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())
    plain = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    for call in (fxlora.adapters, fxlora.active_adapters, fxlora.unload, lambda m: fxlora.set_adapter(m, None), lambda m: fxlora.add_adapter(m, RULES_A, "a")):
        with pytest.raises(fxlora.NotRewrittenError):
            call(plain)


def test_adapters_with_sibling_fusion_stay_fused_when_switched():
    torch.manual_seed(0)
    model = TinyTransformer()
    rules = [Rule("blocks.*.qkv", r=2, alpha=2), Rule("blocks.*.proj", r=2, alpha=2)]
    gm = fxlora.rewrite(model, rules, adapter="a", fuse_siblings=True)
    fxlora.add_adapter(gm, rules, "b")
    randomize_lora(gm)
    x = torch.randint(0, 40, (2, 5))
    fxlora.set_adapter(gm, "b")
    plain = _alone(model, gm, "b", rules)
    torch.testing.assert_close(gm(x), plain(x), atol=1e-6, rtol=1e-6)


def _heads():
    """Two adapters, each training its own copy of the head in full beside its LoRA factors."""
    torch.manual_seed(0)
    model = TinyTransformer()
    gm = fxlora.rewrite(model, RULES_A, adapter="a", train_modules=["head"])
    fxlora.add_adapter(gm, RULES_B[:2], "b", train_modules=["head"])
    randomize_lora(gm, std=0.2)
    with torch.no_grad():
        gm.get_submodule("head_a").weight.normal_()
        gm.get_submodule("head_b").weight.normal_()
    return model, gm


def test_train_modules_switch_train_and_fold_with_their_adapter():
    model, gm = _heads()
    x = torch.randint(0, 40, (2, 5))
    assert not any("head_b" in str(n.target) for n in gm.graph.nodes)  # b's head is not read while a runs
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert {"head_a.weight", "head_a.bias"} <= trainable and not any(n.startswith(("head.", "head_b")) for n in trainable)
    out_a = gm(x)
    # an independent reference: the model with a's head and a's LoRA
    ref = _alone(model, gm, "a", RULES_A)
    ref.get_submodule("head").load_state_dict(gm.get_submodule("head_a").state_dict())
    torch.testing.assert_close(out_a, ref(x), atol=1e-5, rtol=1e-5)
    fxlora.set_adapter(gm, "b")
    assert any("head_b" in str(n.target) for n in gm.graph.nodes) and not any("head_a" in str(n.target) for n in gm.graph.nodes)
    out_b = gm(x)
    out_b.sum().backward()
    assert gm.get_submodule("head_b").weight.grad is not None and gm.get_submodule("head_a").weight.grad is None
    folded = fxlora.fold(gm)  # b's LoRA folded and b's head in place of the head
    torch.testing.assert_close(folded(x), out_b, atol=1e-5, rtol=1e-5)
    assert set(folded.state_dict()) == set(model.state_dict())
    assert torch.equal(folded.get_parameter("head.weight"), gm.get_submodule("head_b").weight)
    assert torch.equal(fxlora.unload(gm)(x), model(x))  # no adapter: the model's own head
    with fxlora.disable_adapter(gm):
        assert torch.equal(gm(x), model(x))
    with pytest.raises(fxlora.ArgumentError, match="both train module 'head' in full"):
        fxlora.set_adapter(gm, ["a", "b"])
    with pytest.raises(fxlora.ArgumentError, match="cannot be scaled"):
        fxlora.fold(gm, adapters={"b": 0.5})
    with pytest.raises(fxlora.ArgumentError, match="trains modules in full"):
        fxlora.serve(gm)
    fxlora.delete_adapter(gm, "a")
    assert not any(n.startswith("head_a") for n, _ in gm.named_modules())


def test_train_modules_are_counted_and_validated():
    from fxlora import zoo

    with torch.device("meta"):
        model = zoo.roberta_base(num_labels=2)
    rules = list(zoo.PAPER["roberta-base"].rules)
    report = fxlora.report(model, rules, train_modules=["classifier"])
    head = sum(p.numel() for p in model.classifier.parameters())
    assert report.trained == {"classifier": head} and report.trainable_params == 294_912 + head
    assert "trained in full: classifier" in report.render()
    assert fxlora.report(model, rules).trainable_params == 294_912
    with pytest.raises(fxlora.RuleError, match="contains the LoRA site"):
        fxlora.plan(TinyTransformer(), RULES_A, train_modules=["blocks.0"])
    with pytest.raises(fxlora.RuleError, match=r"train_modules\[0\] = 'hed' selects no module. Closest names: head"):
        fxlora.plan(TinyTransformer(), RULES_A, train_modules=["hed"])
    with pytest.raises(fxlora.RuleError, match="contains the LoRA site 'blocks.0.qkv'"):
        fxlora.plan(TinyTransformer(), RULES_A, train_modules=[nn.Linear])  # the qkv Linears are sites
    plan = fxlora.plan(TinyTransformer(), [Rule("emb", r=2, alpha=2)], train_modules=[nn.Linear, "blocks.0.*"])
    assert plan.train_modules == ("blocks.0.qkv", "blocks.0.proj", "blocks.1.qkv", "blocks.1.proj", "head", "blocks.0.ln",
                                  "blocks.0.drop")


def test_train_modules_through_torch_export():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm = fxlora.rewrite(model, [Rule("bert.encoder.layer.*.attention.self.query", r=2, alpha=4)], adapter="a",
                        train_modules=["classifier"], example_inputs=(ids,))
    with torch.no_grad():
        gm.get_submodule("classifier_a").weight.normal_()
    out = gm(ids).logits
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(ids).logits, out, atol=1e-5, rtol=1e-5)
    model.load_state_dict(folded.state_dict(), strict=False)  # the folded head is the trained one
    assert torch.equal(model.classifier.weight, gm.get_submodule("classifier_a").weight)


def test_each_adapters_state_dict_and_files_are_portable(tmp_path):
    model, gm = _two_adapters()
    with pytest.raises(fxlora.ArgumentError, match="name one"):
        fxlora.set_adapter(gm, ["a", "b"]) or fxlora.lora_state_dict(gm)
    fxlora.set_adapter(gm, "a")
    sd_b = fxlora.lora_state_dict(gm, adapter="b")
    alone = fxlora.rewrite(model, RULES_B)  # a graph rewritten with b alone: loralib's keys
    assert set(sd_b) == set(fxlora.lora_state_dict(alone)) and not any(k.endswith("_b") for k in sd_b)
    assert fxlora.load_lora_state_dict(alone, sd_b) == ((), ()) or not any(fxlora.load_lora_state_dict(alone, sd_b))
    x = torch.randint(0, 40, (2, 5))
    fxlora.set_adapter(gm, "b")
    torch.testing.assert_close(alone(x), gm(x), atol=1e-6, rtol=1e-6)
    # and back: a single adapter's file loads into adapter b of the two-adapter module
    fxlora.save_lora(alone, tmp_path / "b.safetensors")
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm, "b"):
            gm.get_parameter(name).zero_()
    fxlora.load_lora(gm, tmp_path / "b.safetensors", adapter="b")
    torch.testing.assert_close(gm(x), alone(x), atol=1e-6, rtol=1e-6)
    fxlora.save_lora(gm, tmp_path / "b2.safetensors", adapter="b")
    from safetensors.torch import load_file

    one, two = load_file(tmp_path / "b.safetensors"), load_file(tmp_path / "b2.safetensors")
    assert list(one) == list(two) and all(torch.equal(one[k], two[k]) for k in one)
    fxlora.save_peft_adapter(gm, tmp_path / "peft_b", adapter="b")
    peft_alone = fxlora.rewrite(model, fxlora.peft_rules(tmp_path / "peft_b"))
    fxlora.load_peft_adapter(peft_alone, tmp_path / "peft_b")
    torch.testing.assert_close(peft_alone(x), gm(x), atol=1e-6, rtol=1e-6)
    with pytest.raises(fxlora.CheckpointError, match="missing LoRA keys"):  # a's shapes are not b's
        fxlora.load_lora_state_dict(gm, fxlora.lora_state_dict(gm, adapter="a"), adapter="b")
