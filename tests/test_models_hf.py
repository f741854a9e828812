"""Hugging Face transformers models through torch.export, ResNet-18 and nn.MultiheadAttention.

Models are built from configs with random weights (no downloads).  For each: the output at init
equals the base model's, training through the captured graph lowers the loss with dropout live in
train mode only, fold gives the base graph's op sequence and the unmerged output, and the folded
module exports to ONNX and matches in onnxruntime.
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


class _Logits(nn.Module):
    """Calls a captured model with its fixed keyword arguments (use_cache=False) and returns the logits
    tensor, so the ONNX graph has tensor inputs and outputs only."""

    def __init__(self, inner, kwargs):
        super().__init__()
        self.inner, self.kwargs = inner, kwargs

    def forward(self, x):
        return _logits(self.inner(x, **self.kwargs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_folded_hf_model_matches_in_onnxruntime(name, tmp_path):
    model, x, kw, rules, _ = _case(name)
    gm = fxlora.rewrite(model, rules, example_inputs=x, example_kwargs=kw)
    with torch.no_grad():
        for p in fxlora.lora_state_dict(gm).values():
            p.normal_(0, 0.05)
    folded = _Logits(fxlora.fold(gm).eval(), kw)
    base = _Logits(fxlora.capture(model, example_inputs=x, example_kwargs=kw).eval(), kw)
    fxlora.export.to_onnx(folded, x, tmp_path / "folded.onnx", atol=1e-4)
    fxlora.export.to_onnx(base, x, tmp_path / "base.onnx", atol=1e-4)
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


def test_tied_embedding_is_refused_through_export():
    model, x, kw, _, _ = _case("gpt2")
    with pytest.raises(fxlora.RuleError, match="transformer.wte.*tied"):
        fxlora.rewrite(model, [Rule("transformer.wte", r=2, alpha=2)], example_inputs=x, example_kwargs=kw)


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
    with pytest.raises(fxlora.RuleError, match="never called"):  # symbolic: MHA is a leaf
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
