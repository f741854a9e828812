"""Hugging Face transformers models through torch.export, ResNet-18 and nn.MultiheadAttention.

Models are built from configs with random weights (no downloads).  For each: the output at init
equals the base model's, training through the captured graph lowers the loss with dropout live in
train mode only, fold gives the base graph's op sequence and the unmerged output, and the folded
module exports to ONNX and matches in onnxruntime.  Then the oracles: Falcon (FalconLinear) against
PEFT's ``target_modules``, MoE experts against PEFT's ``target_parameters``, a tied embedding and LM
head against PEFT's ``ensure_weight_tying``; the calling convention of a captured decoder, a
``transformers.Trainer`` run, and the exporters on folded Mistral, T5 and Whisper.
"""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule, zoo
from torch import nn

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import hf_models  # noqa: E402
from helpers import op_sequence, randomize_lora  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread (see tests/test_models_matrix.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(vocab: int = 100, shape=(2, 8), offset: int = 0):
    g = torch.Generator().manual_seed(0)
    return torch.randint(offset, vocab, shape, generator=g)


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg)


def _roberta():
    cfg = transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64, num_labels=3, pad_token_id=1,
    )
    return transformers.RobertaForSequenceClassification(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, attention_dropout=0.1,
    )
    return transformers.LlamaForCausalLM(cfg)


def _vit():
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        num_labels=5,
    )
    return transformers.ViTForImageClassification(cfg)


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


_QV = "re:.*\\.(q_proj|v_proj|query|value)"
CASES = {
    # name: (factory, inputs, kwargs, rules, loss(out, inputs))
    "gpt2": (
        _gpt2, lambda: (_ids(),), {"use_cache": False},
        [Rule("transformer.h.*.attn.c_attn", r=4, alpha=8, enable_lora=[True, False, True])],
        lambda out, x: F.cross_entropy(_logits(out)[:, :-1].flatten(0, 1), x[0][:, 1:].flatten()),
    ),
    "bert": (
        _bert, lambda: (_ids(),), {},
        [Rule("encoder.layer.*.attention.self.query", r=4, alpha=8), Rule("encoder.layer.*.attention.self.value", r=4, alpha=8)],
        # BertModel's output is layer-normalised (mean 0, mean square 1 per token), so a loss must aim it at
        # something that is not: a fixed random target
        lambda out, x: F.mse_loss(_logits(out), torch.randn(_logits(out).shape, generator=torch.Generator().manual_seed(1))),
    ),
    "roberta": (
        _roberta, lambda: (_ids(offset=2),), {},
        [Rule("re:roberta\\.encoder\\.layer\\.\\d+\\.attention\\.self\\.(query|value)", r=4, alpha=8)],
        lambda out, x: F.cross_entropy(_logits(out), torch.tensor([0, 2])),
    ),
    "llama": (
        _llama, lambda: (_ids(),), {"use_cache": False},
        [Rule("model.layers.*.self_attn.*_proj", r=4, alpha=8), Rule("model.layers.*.mlp.*_proj", r=4, alpha=8)],
        lambda out, x: F.cross_entropy(_logits(out)[:, :-1].flatten(0, 1), x[0][:, 1:].flatten()),
    ),
    "vit": (
        _vit, lambda: (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),), {},
        [Rule(_QV, r=4, alpha=8)],
        lambda out, x: F.cross_entropy(_logits(out), torch.tensor([1, 3])),
    ),
}


def _case(name):
    factory, inputs, kwargs, rules, loss = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    return model, inputs(), kwargs, rules, loss


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_model_through_torch_export(name):
    model, x, kw, rules, loss_fn = _case(name)
    with pytest.raises(fxlora.TraceError):  # transformers 5 models do not trace symbolically
        fxlora.rewrite(model, rules, capture="symbolic")
    gm = fxlora.rewrite(model, rules, example_inputs=x, example_kwargs=kw)
    assert gm.meta["fxlora_capture"] == "torch.export" and not gm.training
    sites = fxlora.graph_sites(gm)
    assert sites and all("lora" not in s for s in sites)
    with torch.no_grad():
        base_out = _logits(model(*x, **kw))
        assert torch.equal(_logits(gm(*x, **kw)), base_out)

    # train through the captured graph: dropout live in train mode, the loss falls
    gm.train()
    with torch.no_grad():
        if name != "vit":  # ViT's config has no dropout by default
            assert not torch.equal(_logits(gm(*x, **kw)), _logits(gm(*x, **kw)))
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = loss_fn(gm(*x, **kw), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags are untouched

    gm.eval()
    with torch.no_grad():
        assert torch.equal(_logits(gm(*x, **kw)), _logits(gm(*x, **kw)))  # dropout off in eval
        unmerged = _logits(gm(*x, **kw))
        assert not torch.allclose(unmerged, base_out, atol=1e-6)
        folded = fxlora.fold(gm).eval()
        torch.testing.assert_close(_logits(folded(*x, **kw)), unmerged, atol=1e-5, rtol=1e-4)
    base_graph = fxlora.capture(model, example_inputs=x, example_kwargs=kw)
    assert [(n.op, n.target) for n in folded.graph.nodes] == [(n.op, n.target) for n in base_graph.graph.nodes]
    assert set(folded.state_dict()) == set(base_graph.state_dict())


@pytest.mark.parametrize("name", sorted(CASES))
def test_folded_hf_model_matches_in_onnxruntime(name, tmp_path):
    model, x, kw, rules, _ = _case(name)
    gm = fxlora.rewrite(model, rules, example_inputs=x, example_kwargs=kw)
    with torch.no_grad():
        for p in fxlora.lora_state_dict(gm).values():
            p.normal_(0, 0.05)
    folded = fxlora.fold(gm).eval()
    base = fxlora.capture(model, example_inputs=x, example_kwargs=kw).eval()
    # no wrapper: the folded module is called like the model (use_cache=False is its captured default)
    call_kw = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    fxlora.export.to_onnx(folded, x, tmp_path / "folded.onnx", example_kwargs=call_kw, atol=1e-4)
    fxlora.export.to_onnx(base, x, tmp_path / "base.onnx", example_kwargs=call_kw, atol=1e-4)
    assert fxlora.export.onnx_op_counts(tmp_path / "folded.onnx") == fxlora.export.onnx_op_counts(tmp_path / "base.onnx")


def test_same_rule_text_selects_the_same_sites_in_both_capture_methods():
    torch.manual_seed(0)
    model = zoo.gpt2_tiny().eval()
    rules = [Rule("transformer.h.*.attn.c_attn", r=4, alpha=8, enable_lora=[True, False, True]), Rule(nn.Embedding, r=2, alpha=2)]
    rules = [rules[0], Rule("transformer.wpe", r=2, alpha=2), Rule("re:transformer\\.h\\.\\d\\.mlp\\.c_fc", r=2, alpha=2)]
    x = torch.randint(0, 256, (2, 12))
    sym = fxlora.rewrite(model, rules, capture="symbolic")
    exp = fxlora.rewrite(model, rules, example_inputs=(x,), capture="export")
    assert sym.meta["fxlora_capture"] == "symbolic_trace" and exp.meta["fxlora_capture"] == "torch.export"
    assert list(fxlora.graph_sites(sym)) == list(fxlora.graph_sites(exp))
    s_sd, e_sd = fxlora.lora_state_dict(sym), fxlora.lora_state_dict(exp)
    assert {k: v.shape for k, v in s_sd.items()} == {k: v.shape for k, v in e_sd.items()}
    with torch.no_grad():
        for v in s_sd.values():
            v.normal_(0, 0.05)
    fxlora.load_lora_state_dict(exp, s_sd)
    with torch.no_grad():
        torch.testing.assert_close(exp(x), sym(x), atol=1e-5, rtol=1e-5)
    # a type rule selects the same modules through the ATen graph too
    lin_sym = fxlora.graph_sites(fxlora.rewrite(model, [Rule(zoo.Conv1D, r=1, alpha=1)]))
    lin_exp = fxlora.graph_sites(fxlora.rewrite(model, [Rule(zoo.Conv1D, r=1, alpha=1)], example_inputs=(x,), capture="export"))
    assert list(lin_sym) == list(lin_exp) and len(lin_sym) == 16
    assert all(s.fan_in_fan_out for s in lin_exp.values())  # aten.addmm(b, x, W): read from the graph


def test_capture_auto_falls_back_and_says_which():
    model, x, kw, _, _ = _case("gpt2")
    with pytest.raises(fxlora.TraceError, match="pass example_inputs"):
        fxlora.capture(model)
    with pytest.raises(fxlora.ArgumentError, match="takes the capture options as keywords"):
        fxlora.capture(model, x, kw)  # the old positional spelling names the new one
    gm = fxlora.capture(model, example_inputs=x, example_kwargs=kw)
    assert gm.meta["fxlora_capture"] == "torch.export"
    opts = fxlora.CaptureOptions(method="export", example_inputs=x, example_kwargs=kw)
    assert fxlora.capture(model, capture=opts).meta["fxlora_capture"] == "torch.export"
    assert fxlora.capture(zoo.gpt2_tiny()).meta["fxlora_capture"] == "symbolic_trace"
    with pytest.raises(fxlora.TraceError, match="needs example inputs"):
        fxlora.capture(model, capture="export")
    with pytest.raises(fxlora.ArgumentError, match="capture method must be one of"):
        fxlora.capture(model, example_inputs=x, capture="jit")
    with pytest.raises(fxlora.ArgumentError, match="unexpected keyword arguments example_input;"):
        fxlora.rewrite(model, [Rule("x", r=1, alpha=1)], example_input=x)
    # a captured module can be rewritten later
    lgm = fxlora.rewrite(gm, [Rule("transformer.h.0.attn.c_proj", r=2, alpha=2)])
    with torch.no_grad():
        assert torch.equal(lgm(*x, **kw).logits, model(*x, **kw).logits)


def test_tied_embedding_through_export_adapts_the_weight_or_is_refused():
    model, x, kw, _, _ = _case("gpt2")
    with pytest.raises(fxlora.RuleError, match="transformer.wte.*tied"):
        fxlora.rewrite(model, [Rule("transformer.wte", r=2, alpha=2)], example_inputs=x, example_kwargs=kw, tied="refuse")
    gm = fxlora.rewrite(model, [Rule("lm_head", r=2, alpha=2)], example_inputs=x, example_kwargs=kw)
    (spec,) = fxlora.graph_sites(gm).values()
    assert spec.kind == "tied" and spec.name == "transformer.wte" and set(spec.op["names"]) >= {"transformer.wte", "lm_head"}


def test_resnet18_convolutions_through_symbolic_trace(tmp_path):
    torch.manual_seed(0)
    model = zoo.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    rules = [Rule("layer*.*.conv*", r=4, alpha=8), Rule("conv1", r=2, alpha=2), Rule("fc", r=2, alpha=2)]
    gm = fxlora.rewrite(model, rules)
    assert gm.meta["fxlora_capture"] == "symbolic_trace" and len(fxlora.graph_sites(gm)) == 18
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    gm.train()
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.05)
    y = torch.tensor([3, 7])
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    gm.eval()
    folded = fxlora.fold(gm).eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), gm(x), atol=1e-4, rtol=1e-4)
    base_graph = torch.fx.symbolic_trace(model)
    assert [(n.op, n.target) for n in folded.graph.nodes] == [(n.op, n.target) for n in base_graph.graph.nodes]
    fxlora.export.to_onnx(folded, (x,), tmp_path / "resnet.onnx", atol=1e-4)


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_multihead_attention_in_and_out_projections(tmp_path):
    torch.manual_seed(0)
    model = _MHA().eval()
    x = torch.randn(2, 5, 16)
    rules = [Rule("attn.in_proj_weight", r=4, alpha=8), Rule("attn.out_proj", r=2, alpha=2)]
    with pytest.raises(fxlora.RuleError, match="runs inside 'attn'.*example_inputs"):  # symbolic: MHA is a leaf
        fxlora.rewrite(model, [Rule("attn.out_proj", r=2, alpha=2)], capture="symbolic")
    gm = fxlora.rewrite(model, rules, example_inputs=(x,))  # "auto": symbolic cannot see inside MHA
    assert gm.meta["fxlora_capture"] == "torch.export"
    sites = fxlora.graph_sites(gm)
    assert set(sites) == {"attn.in_proj_weight", "attn.out_proj"}
    with torch.no_grad():
        for v in fxlora.lora_state_dict(gm).values():
            v.normal_(0, 0.1)
    sd = fxlora.lora_state_dict(gm)
    # independent reference: the same module with W + B A scale written in, once per projection
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.attn.in_proj_weight += sd["attn.in_proj_weight_lora_B"] @ sd["attn.in_proj_weight_lora_A"] * 2.0
        ref.attn.out_proj.weight += sd["attn.out_proj.lora_B"] @ sd["attn.out_proj.lora_A"] * 1.0
        torch.testing.assert_close(gm.eval()(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fxlora.fold(gm)(x), ref(x), atol=1e-5, rtol=1e-5)
        gm.train()
        assert not torch.equal(gm(x), gm(x))  # MHA's attention dropout is live again in train mode
    folded = fxlora.fold(gm).eval()
    base = fxlora.capture(model, example_inputs=(x,), capture="export").eval()
    assert [(n.op, n.target) for n in folded.graph.nodes] == [(n.op, n.target) for n in base.graph.nodes]
    fxlora.export.to_onnx(folded, (x,), tmp_path / "mha.onnx", atol=1e-4)
    fxlora.export.to_onnx(base, (x,), tmp_path / "base.onnx", atol=1e-4)
    assert fxlora.export.onnx_op_counts(tmp_path / "mha.onnx") == fxlora.export.onnx_op_counts(tmp_path / "base.onnx")


def test_report_of_a_transformers_model():
    model, x, kw, rules, _ = _case("bert")
    rep = fxlora.report(model, rules, example_inputs=x, example_kwargs=kw)
    assert [r.name for r in rep.rows] == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    assert rep.lora_params == 4 * (4 * 32 + 32 * 4)
    assert rep.base_params == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- #
# Oracles: PEFT and independent references
# --------------------------------------------------------------------------------------------- #

peft = pytest.importorskip("peft")
FALCON_LINEARS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def _random_peft_factors(peft_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("new_decoder_architecture", [True, False])
def test_falcon_adapts_its_falcon_linears_like_peft(new_decoder_architecture):
    torch.manual_seed(0)
    model = hf_models.falcon(new_decoder_architecture).eval()
    ids, kw = hf_models.ids(), {"use_cache": False}
    rule = Rule("re:transformer\\.h\\.\\d+\\.(self_attention\\.(query_key_value|dense)|mlp\\.dense_(h_to_4h|4h_to_h))", r=2, alpha=4)
    base = fxlora.capture(model, example_inputs=(ids,), example_kwargs=kw)
    gm = fxlora.rewrite(base, [rule])
    sites = fxlora.graph_sites(gm)
    assert len(sites) == 8 and all(s.kind == "linear" and not s.fan_in_fan_out for s in sites.values())
    # a type rule sees them too: FalconLinear subclasses nn.Linear (the tied LM head joins as one tied site)
    typed = fxlora.graph_sites(fxlora.rewrite(base, [Rule(nn.Linear, r=2, alpha=4)]))
    assert set(sites) < set(typed) and typed["transformer.word_embeddings"].kind == "tied"

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=FALCON_LINEARS))
    _random_peft_factors(pm)
    peft_sd = dict(pm.named_parameters())
    fxlora.load_lora_state_dict(gm, {
        name: peft_sd[f"base_model.model.{site}.lora_{ab}.default.weight"]
        for site, spec in sites.items() for ab, name in (("A", spec.lora_A), ("B", spec.lora_B))
    })
    ref = copy.deepcopy(model)  # independent reference: W + scale * B @ A in each FalconLinear
    with torch.no_grad():
        for site, spec in sites.items():
            ref.get_submodule(site).weight += gm.get_parameter(spec.lora_B) @ gm.get_parameter(spec.lora_A) * 2.0
        unmerged = gm(ids).logits
        torch.testing.assert_close(unmerged, ref(ids, **kw).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unmerged, pm(ids, **kw).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unmerged, model(ids, **kw).logits, atol=1e-3)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(ids).logits, pm.merge_and_unload()(ids, **kw).logits, atol=1e-5, rtol=1e-5)
    assert op_sequence(folded) == op_sequence(base)


def _peft_experts_factors(peft_model, sites):
    """PEFT's ParamWrapper factors in fxlora's per-expert layout: lora_A (r*E, in) -> (E, r, in),
    lora_B (out, r*E) -> (E, out, r) (PEFT's get_delta_factors)."""
    from peft.tuners.lora.layer import ParamWrapper

    state = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        owner = name.removeprefix("base_model.model.")
        while owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
        spec = sites[f"{owner}.{module.parameter_name}"]
        e = spec.weight_shape[0]
        state[spec.lora_A] = module.lora_A["default"].weight.reshape(e, spec.r, spec.in_features)
        state[spec.lora_B] = module.lora_B["default"].weight.reshape(spec.out_features, spec.r, e).permute(2, 0, 1)
    return state


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("factory", ["mixtral", "qwen2_moe"])
def test_moe_experts_like_peft_target_parameters(factory, implementation):
    torch.manual_seed(0)
    model = getattr(hf_models, factory)(implementation).eval()
    ids, kw = hf_models.ids(), {"use_cache": False}
    gm = fxlora.rewrite(model, [Rule("model.layers.*.mlp.experts.*", r=2, alpha=4)], example_inputs=(ids,), example_kwargs=kw)
    sites = fxlora.graph_sites(gm)
    assert sorted(sites) == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")]
    assert all(s.kind == "experts" and not s.fan_in_fan_out for s in sites.values())
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_parameters=targets, target_modules=[]))
    _random_peft_factors(pm)
    fxlora.load_lora_state_dict(gm, _peft_experts_factors(pm, sites))
    ref = copy.deepcopy(model)  # independent reference: W[e] + scale * B[e] @ A[e]
    with torch.no_grad():
        for name, spec in sites.items():
            ref.get_parameter(name).add_(torch.einsum("eor,eri->eoi", gm.get_parameter(spec.lora_B), gm.get_parameter(spec.lora_A)) * 2.0)
        unmerged = gm(ids).logits
        torch.testing.assert_close(unmerged, ref(ids, **kw).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unmerged, pm(ids, **kw).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(unmerged, model(ids, **kw).logits, atol=1e-3)
        torch.testing.assert_close(fxlora.fold(gm)(ids).logits, pm.merge_and_unload()(ids, **kw).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_moe_expert_factors_train(implementation):
    torch.manual_seed(0)
    model = hf_models.mixtral(implementation)
    ids = hf_models.ids()
    gm = fxlora.rewrite(model, [Rule("*.experts.*", r=2, alpha=4)], example_inputs=(ids,), example_kwargs={"labels": ids, "use_cache": False})
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(4):
        loss = gm(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert all(gm.get_parameter(s.lora_B).abs().sum() > 0 for s in fxlora.graph_sites(gm).values())


def test_tied_embedding_and_head_like_peft_ensure_weight_tying():
    torch.manual_seed(0)
    model = hf_models.gemma().eval()
    ids, kw = hf_models.ids(), {"use_cache": False}
    gm = fxlora.rewrite(model, [Rule("lm_head", r=2, alpha=4)], example_inputs=(ids,), example_kwargs=kw)
    (spec,) = fxlora.graph_sites(gm).values()
    assert spec.kind == "tied" and set(spec.op["names"]) == {"model.embed_tokens", "lm_head"}
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head"], ensure_weight_tying=True)
    pm = peft.get_peft_model(copy.deepcopy(model), config)
    emb, head = pm.base_model.model.model.embed_tokens, pm.base_model.model.lm_head
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT ties the head's pair to the embedding's (lora_A = emb_B.T, lora_B = emb_A.T)
        emb.lora_embedding_A["default"].copy_(torch.randn(2, 100, generator=g) * 0.1)
        emb.lora_embedding_B["default"].copy_(torch.randn(32, 2, generator=g) * 0.1)
    A, B = head.lora_A["default"].weight.detach().clone(), head.lora_B["default"].weight.detach().clone()
    fxlora.load_lora_state_dict(gm, {spec.lora_A: A, spec.lora_B: B})
    W = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        unmerged = gm(ids).logits
        torch.testing.assert_close(unmerged, pm(ids, **kw).logits, atol=1e-5, rtol=1e-5)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        with pytest.warns(UserWarning, match="tie_word_embeddings"):  # PEFT warns about merging tied modules
            merged = pm.merge_and_unload()
    assert folded.get_parameter("lm_head.weight") is folded.get_parameter("model.embed_tokens.weight")
    torch.testing.assert_close(folded.get_parameter("lm_head.weight"), W + B @ A * 2.0)  # folded once
    # PEFT's merge_and_unload merges the tied update once per module, so the shared weight gets it twice
    torch.testing.assert_close(merged.lm_head.weight, W + 2 * (B @ A * 2.0), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- #
# Called like the model; trained by transformers.Trainer; exported as it is called
# --------------------------------------------------------------------------------------------- #


def test_a_captured_decoder_is_called_like_the_model():
    torch.manual_seed(0)
    model = hf_models.mistral().eval()
    ids = hf_models.ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    gm = fxlora.rewrite(model, [Rule("*q_proj", r=2, alpha=2)], example_inputs=(ids,), example_kwargs={"use_cache": False, "attention_mask": mask})
    randomize_lora(gm)
    folded = fxlora.fold(gm)
    with torch.no_grad():
        expected = gm(ids, attention_mask=mask).logits
        for module in (gm, folded):
            torch.testing.assert_close(module(ids, mask).logits, expected)
            torch.testing.assert_close(module(input_ids=ids, attention_mask=mask).logits, expected)
            torch.testing.assert_close(module(ids, attention_mask=mask, use_cache=False, labels=None).logits, expected)
            with pytest.raises(fxlora.ArgumentError, match="use_cache=True differs from the value MistralForCausalLM was captured with"):
                module(ids, attention_mask=mask, use_cache=True)
            with pytest.raises(fxlora.ArgumentError, match="captured with attention_mask=<tensor>"):
                module(ids)
            with pytest.raises(fxlora.ArgumentError, match="position_ids was not given when MistralForCausalLM was captured"):
                module(ids, attention_mask=mask, position_ids=torch.arange(8)[None])
    # captured with the ids alone: gm(ids) and gm(input_ids=ids), as the model is called
    plain = fxlora.rewrite(model, [Rule("*q_proj", r=2, alpha=2)], example_inputs=(ids,), example_kwargs={"use_cache": False})
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits)
        torch.testing.assert_close(fxlora.fold(plain)(input_ids=ids).logits, model(ids).logits)


def test_transformers_trainer_trains_a_rewritten_decoder(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = hf_models.mistral()
    ids = hf_models.ids((4, 8))
    mask = torch.ones_like(ids)
    gm = fxlora.rewrite(
        model, [Rule("model.layers.*.self_attn.*_proj", r=4, alpha=8)],
        example_inputs=(ids,), example_kwargs={"attention_mask": mask, "labels": ids, "use_cache": False},
    )
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i]} for i in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-2, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
    )
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    frozen = {n: p.clone() for n, p in gm.named_parameters() if not p.requires_grad}
    trainer = Trainer(model=gm, args=args, train_dataset=rows)
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert result.global_step == 6 and len(losses) == 6 and losses[-1] < losses[0], losses
    after = fxlora.lora_state_dict(gm)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))
    assert all(torch.equal(p, frozen[n]) for n, p in gm.named_parameters() if n in frozen)
    with torch.no_grad():  # the trained module folds, and is called the same way
        torch.testing.assert_close(fxlora.fold(gm).eval()(ids, mask, labels=ids).logits, gm.eval()(ids, mask, labels=ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["mistral", "t5", "whisper"])
def test_folded_models_export_as_they_are_called(name, tmp_path):
    model, args, kwargs = hf_models.build(name)
    gm = fxlora.rewrite(model, [Rule("re:.*\\.(q|q_proj)", r=2, alpha=4)], example_inputs=args, example_kwargs=kwargs)
    randomize_lora(gm, std=0.05)
    folded = fxlora.fold(gm).eval()
    call_kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}  # use_cache=False is the default now
    onnx = fxlora.export.to_onnx(folded, args, tmp_path / "m.onnx", example_kwargs=call_kwargs, optimize=False)
    assert onnx.output_names[0] == "logits" and onnx.max_abs_diff < 1e-4
    ep = fxlora.export.to_exported_program(folded, args, tmp_path / "m.pt2", example_kwargs=call_kwargs)
    with torch.no_grad():
        torch.testing.assert_close(ep.artifact.module()(*args, **call_kwargs).logits, folded(*args, **call_kwargs).logits)
    ts = fxlora.export.to_torchscript(folded, args, tmp_path / "m.pt", example_kwargs=call_kwargs)
    assert ts.input_names[0] == ("input_features" if name == "whisper" else "input_ids") and ts.output_names[0] == "logits"
    flat = [t for t in (*args, *call_kwargs.values())]
    with torch.no_grad():
        torch.testing.assert_close(ts.artifact(*flat)[0], folded(*args, **call_kwargs).logits)


def test_t5_rule_on_the_owner_of_the_shared_weight_adapts_it_at_every_use():
    torch.manual_seed(0)
    model = hf_models.t5().eval()
    args, kw = hf_models._seq2seq()
    ids, dec = args[0], kw["decoder_input_ids"]
    assert model.lm_head.weight is model.shared.weight
    captured = fxlora.capture(model, example_inputs=args, example_kwargs=kw)  # one capture, planned three ways
    with pytest.raises(fxlora.RuleError, match=r"'shared.weight' is the weight of the sites .*write Rule\('shared'"):
        fxlora.rewrite(captured, [Rule("shared.weight", r=2, alpha=4)])
    for target in ("shared", "lm_head"):
        gm = fxlora.rewrite(captured, [Rule(target, r=2, alpha=4)])
        (spec,) = fxlora.graph_sites(gm).values()  # one LoRA pair for the weight, whichever name selects it
        assert spec.kind == "tied" and {"shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"} <= set(spec.op["names"])
    randomize_lora(gm, std=0.2)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # an independent reference: the shared weight plus B @ A * alpha / r, by hand
        reference.shared.weight.add_(gm.get_parameter(spec.lora_B) @ gm.get_parameter(spec.lora_A) * 2.0)
        expected = reference(ids, decoder_input_ids=dec, use_cache=False).logits
        assert not torch.allclose(expected, model(ids, decoder_input_ids=dec, use_cache=False).logits, atol=1e-3)
        before = gm(ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(before, expected, atol=1e-5, rtol=1e-5)
        folded = fxlora.fold(gm)
        torch.testing.assert_close(folded(ids, decoder_input_ids=dec).logits, expected, atol=1e-5, rtol=1e-5)
        assert folded.get_parameter("lm_head.weight") is folded.get_parameter("shared.weight")  # folded once, still tied
        # F: a keyword the model takes through **kwargs but was not captured with is an ArgumentError naming it
        for extra in ({"return_dict": False}, {"output_attentions": True}):
            with pytest.raises(fxlora.ArgumentError, match=f"{next(iter(extra))} was not given when T5ForConditionalGeneration was captured"):
                gm(ids, decoder_input_ids=dec, **extra)
        target = copy.deepcopy(model)
        fxlora.load_folded(target, folded)
        assert target.lm_head.weight is target.shared.weight
        torch.testing.assert_close(target(ids, decoder_input_ids=dec, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(gm(ids, decoder_input_ids=dec).logits, before)


def test_load_folded_keeps_gpt2s_tied_embedding_and_head_and_leaves_gm_as_it_was():
    torch.manual_seed(0)
    model = _gpt2().eval()
    ids = _ids()
    gm = fxlora.rewrite(model, [Rule("lm_head", r=2, alpha=4), Rule("*.c_attn", r=2, alpha=4)], example_inputs=(ids,),
                        example_kwargs={"use_cache": False})
    assert "tied" in {s.kind for s in fxlora.graph_sites(gm).values()}
    randomize_lora(gm, std=0.2)
    with torch.no_grad():
        before = gm(ids).logits
        fxlora.load_folded(model, gm)
        assert model.lm_head.weight is model.transformer.wte.weight
        torch.testing.assert_close(model(ids, use_cache=False).logits, before, atol=1e-5, rtol=1e-5)
        assert torch.equal(gm(ids).logits, before)  # the update is not applied twice
        torch.testing.assert_close(fxlora.fold(gm)(ids).logits, before, atol=1e-5, rtol=1e-5)
