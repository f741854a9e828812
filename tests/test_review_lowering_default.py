"""Outside review of the eager lowering on by default (bbb1ef7..HEAD: ``gm.lower_branches`` "auto"/True/False,
the lowered copy calling ``fxlora.ops.BINDINGS`` instead of ATen overloads, the scale folded into the call).

Contract: on CPU, ``lower_branches = True`` under ``torch.no_grad()`` / ``torch.inference_mode()`` gives what
``lower_branches = False`` gives (float32, to rounding), raises where the graph raises and nowhere else, and
never changes the module.  The two bugs it found (an export graph's positional memory_format for
aten.to.dtype; the bindings kept after a tensor became a subclass) were strict xfails in 5b38c57 and are
fixed; the rest pin down what held.
"""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule, ops
from torch import nn

from helpers import Functional, TinyTransformer, randomize_lora


def _out(gm, mode, call, ctx=torch.no_grad):
    gm.lower_branches = mode
    ops.counters.clear()
    torch.manual_seed(1)
    with ctx():
        out = call(gm)
    return out, dict(ops.counters)


def _assert_same(gm, call, ctx=torch.no_grad, lowers=True):
    ref, calls0 = _out(gm, False, call, ctx)
    got, calls1 = _out(gm, True, call, ctx)
    assert not calls0
    if lowers:
        assert calls1.get("linear.merged", 0) + calls1.get("linear.branch", 0) > 0, calls1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    return calls1


def _export(model, example, rules, **kw):
    torch.manual_seed(0)
    gm = fxlora.rewrite(model.eval(), rules, capture="export", example_inputs=example, **kw)
    randomize_lora(gm)
    return gm


# --------------------------------------------------------------------------------------------- #
# bugs found by the review (fixed)
# --------------------------------------------------------------------------------------------- #


class _ToMemoryFormat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        # torch.export records aten.to.dtype(h, float64, False, False, torch.contiguous_format): memory_format
        # is positional in the ATen schema, keyword-only in Tensor.to
        return h.to(torch.float64, memory_format=torch.contiguous_format).float() + h


def test_export_capture_with_to_memory_format_runs_lowered():
    gm = _export(_ToMemoryFormat(), (torch.randn(4, 8),), [Rule("fc", r=2, alpha=4)])
    assert any(n.target is torch.ops.aten.to.dtype and len(n.args) == 5 for n in gm.graph.nodes)
    _assert_same(gm, lambda g: g(torch.randn(4, 8)))


def test_binding_of_to_dtype_accepts_its_overloads_positional_memory_format_directly():
    x = torch.randn(2, 3)
    args = (x, torch.float64, False, False, torch.contiguous_format)
    expected = torch.ops.aten.to.dtype(*args)  # the overload takes it
    binding = ops.BINDINGS[torch.ops.aten.to.dtype]
    with pytest.raises(TypeError):  # the binding does not: the bug above, at its root
        binding(*args)
    # the fix: the lowering moves it to the keyword the binding takes
    assert ops.BINDING_KEYWORDS[binding] == {4: "memory_format"}
    torch.testing.assert_close(binding(*args[:4], memory_format=args[4]), expected, rtol=0, atol=0)


class _Tagged(torch.Tensor):
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("g", torch.ones(8))

    def forward(self, x):
        return self.fc(x) * self.g


def test_a_subclass_assigned_after_the_first_lowered_call_gets_the_overloads():
    def build():
        gm = _export(_Gain(), (torch.randn(3, 8),), [Rule("fc", r=2, alpha=4)])
        gm.lower_branches = True
        return gm

    x = torch.randn(3, 8)
    fresh = build()
    fresh.g = torch.ones(8).as_subclass(_Tagged)
    _Tagged.seen.clear()
    with torch.no_grad():
        fresh(x)
    before = [str(f) for f in _Tagged.seen]
    assert before == ["aten.mul.Tensor"]  # documented: with a subclass the overloads are kept

    late = build()
    with torch.no_grad():
        late(x)  # lowering built with plain tensors
    late.g = torch.ones(8).as_subclass(_Tagged)
    _Tagged.seen.clear()
    with torch.no_grad():
        late(x)
    assert [str(f) for f in _Tagged.seen] == before


# --------------------------------------------------------------------------------------------- #
# what held
# --------------------------------------------------------------------------------------------- #


class _ManyOps(nn.Module):
    """The BINDINGS ops in the argument forms export records: mean.dim with dtype=, softmax.int with a
    positional dtype, cat of a tuple, select.int with a SymInt index, gelu approximate=, integer indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x, idx):
        h = self.fc(x)
        a = h.mean(-1, keepdim=True, dtype=torch.float64).to(torch.float32)
        c = torch.cat((h, h.double().float()), dim=-1)[..., :8]
        d = torch.softmax(h, -1, dtype=torch.float64).float()
        e = h.select(0, x.shape[0] - 1)
        f = h * 2 + a + c + d + e + h[idx]
        return self.fc2(torch.pow(f, 2) / 3 - F.gelu(f, approximate="tanh"))


@pytest.mark.parametrize("dynamic", [False, True])
def test_export_graph_argument_forms_lower_to_the_same_values(dynamic):
    x, idx = torch.randn(4, 8), torch.tensor([1, 0, 3, 2])
    kw = {}
    if dynamic:
        b = torch.export.Dim("b", min=2)
        kw["dynamic_shapes"] = ({0: b}, {0: b})
    gm = _export(_ManyOps(), (x, idx), [Rule("fc*", r=2, alpha=4)], **kw)
    _assert_same(gm, lambda g: g(x, idx))
    _assert_same(gm, lambda g: g(torch.randn(6, 8), torch.tensor([1, 0, 3, 2, 5, 4])), ctx=torch.inference_mode)


def test_binding_argument_forms_match_their_overloads():
    a = torch.ops.aten
    x, i = torch.randn(2, 3, 4), torch.tensor([[0, 1], [2, 1]])
    cases = [
        (a.to.dtype, (x, torch.float64, False, True), {}),
        (a.to.dtype, (x, torch.float64), {"memory_format": torch.preserve_format}),
        (a.mean.dim, (x, None, True), {}),
        (a.mean.dim, (x, [-1], False), {"dtype": torch.float64}),
        (a.softmax.int, (x, -1, torch.float64), {}),
        (a.cat.default, ((x, x), 1), {}),
        (a.embedding.default, (x[0], i, 1), {}),
        (a.layer_norm.default, (x, [4], None, None, 1e-3, False), {}),
        (a.add.Tensor, (x, 2), {"alpha": 3}),
        (a.mul.Tensor, (x, True), {}),
        (a.div.Tensor, (x.long(), 3), {}),
        (a.view.default, (x, (6, -1)), {}),
        (a.addmm.default, (torch.randn(5), x[0], torch.randn(4, 5)), {"beta": 2, "alpha": 3}),
        (a.scaled_dot_product_attention.default, (x[None], x[None], x[None], None, 0.0, True), {"scale": 0.5}),
        (a._assert_tensor_metadata.default, (x, [2, 3, 4], [12, 4, 1], torch.float32), {"device": torch.device("cpu")}),
    ]
    for op, args, kwargs in cases:
        ref = op(*args, **kwargs)
        got = ops.BINDINGS[op](*args, **kwargs)
        if isinstance(ref, torch.Tensor):
            assert got.dtype == ref.dtype and torch.equal(got, ref), op
    for bad in (([3, 2, 4], None, None), (None, [1, 2, 6], None), (None, None, torch.float64)):
        with pytest.raises(RuntimeError):
            a._assert_tensor_metadata.default(x, *bad)
        with pytest.raises(RuntimeError):  # fxlora's TraceError is a RuntimeError
            ops.check_tensor_metadata(x, *bad)


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_functional_sites_edge_inputs(capture):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    gm = fxlora.rewrite(Functional().eval(), [Rule("*", r=2, alpha=4)], capture=capture, example_inputs=(x,))
    randomize_lora(gm)
    graph_code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    _assert_same(gm, lambda g: g(x))
    _assert_same(gm, lambda g: g(x.transpose(0, 1)))  # non-contiguous
    _assert_same(gm, lambda g: g(x[:0]))  # zero-size
    _assert_same(gm, lambda g: g(torch.randn(40, 30, 8)), ctx=torch.inference_mode)  # merges
    if capture == "symbolic":
        _assert_same(gm, lambda g: g(x[0, 0]))  # 1-D
    assert gm.code == graph_code
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_lora_dropout_in_train_mode_without_gradients(capture):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4, dropout=0.3)], capture=capture, example_inputs=(x,)).train()
    randomize_lora(gm)
    # the same dropout masks (each dropout is called where the graph calls it); in train mode a LoRA dropout
    # is not the identity, so its sites run the branch over the dropout's output, never a merge
    calls = _assert_same(gm, lambda g: g(x))
    assert "linear.merged" not in calls and calls.get("linear.branch", 0) > 0


def test_fuse_siblings_and_copies():
    ids = torch.randint(0, 40, (2, 6))
    gm = _export(TinyTransformer(), (ids,), [Rule("blocks.*.qkv", r=2, alpha=4), Rule("head", r=2, alpha=4)],
                 fuse_siblings=True)
    _assert_same(gm, lambda g: g(ids))
    twin = copy.deepcopy(gm)
    _assert_same(twin, lambda g: g(ids))
    with torch.no_grad():
        twin.get_parameter(fxlora.lora_parameter_names(twin)[0]).mul_(3)
    _assert_same(twin, lambda g: g(ids))


def test_hugging_face_llama_and_gpt2_exports():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=50, max_position_embeddings=32)
    gm = fxlora.rewrite(transformers.LlamaForCausalLM(cfg).eval(),
                        [Rule("model.layers.*.self_attn.*_proj", r=4, alpha=8), Rule("model.layers.*.mlp.*", r=2, alpha=4)],
                        example_inputs=(ids,), example_kwargs={"use_cache": False})
    randomize_lora(gm)
    _assert_same(gm, lambda g: g(ids).logits)
    _assert_same(gm, lambda g: g(torch.randint(0, 50, (3, 5))).logits, ctx=torch.inference_mode)
    gcfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=32)
    gm = fxlora.rewrite(transformers.GPT2LMHeadModel(gcfg).eval(),
                        [Rule("transformer.h.*.attn.c_attn", r=2, alpha=4, enable_lora=[True, False, True]),
                         Rule("transformer.h.*.mlp.*", r=2, alpha=4)],
                        fuse_siblings=True, example_inputs=(ids,), example_kwargs={"use_cache": False})
    randomize_lora(gm)
    _assert_same(gm, lambda g: g(ids).logits)
