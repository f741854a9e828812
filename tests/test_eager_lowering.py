"""Eager lowering: a rewritten module runs its linear branches through ``fxlora.ops``'s eager functions
(merged per call where that moves less memory) while its graph, state dict and fold are unchanged, and
exporters and tracers see the rewritten graph (``torch.compile(gm)`` compiles what an eager call runs).  Merging runs only where no gradient is recorded (a train step runs the
graph's own operators through their Python bindings); ``lower_branches`` is
``"auto"`` by default, which lowers on CUDA half precision only; on CPU these tests switch it on, and compare
with the same module running its own graph (float32: equal to rounding)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers
from helpers import CompiledGraphs as _Graphs, Functional, TinyTransformer, randomize_lora
from test_ops import SCALE, assert_within_bound, make_inputs, reference_and_magnitude

import fxlora
from fxlora import Rule, ops
from fxlora.errors import ArgumentError

IDS = torch.randint(0, 40, (4, 24), generator=torch.Generator().manual_seed(0))

# captured with torch.export (TinyTransformer): the linear bases are functional calls, which lower; a base
# that is a module call (an nn.Linear in a symbolic trace) stays one, with its hooks and its current class
CASES = {
    "masked_qkv_and_plain": (TinyTransformer, lambda: IDS,
                             [Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]), Rule("head", r=3, alpha=3)], False),
    "fused_siblings": (TinyTransformer, lambda: IDS,
                       [Rule("blocks.*.qkv", r=2, alpha=4), Rule("blocks.*.proj", r=2, alpha=2)], True),
    "functional_x_at_w_and_dropout": (Functional, lambda: torch.randn(4, 24, 8), [Rule("*", r=2, alpha=4, dropout=0.25)], False),
}


def _tiny(rules, **kw):
    return fxlora.rewrite(TinyTransformer(), rules, capture="export", example_inputs=(IDS,), **kw)


def _run(gm, x, mode):
    """Output, gradients of every trainable parameter, and the eager calls counted, with ``lower_branches=mode``."""
    gm.lower_branches = mode
    for p in gm.parameters():
        p.grad = None
    ops.counters.clear()
    torch.manual_seed(1)  # the same dropout masks in both runs
    out = gm(x)
    if out.requires_grad:
        out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    return out.detach(), grads, dict(ops.counters)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_lowered_forward_computes_what_the_graph_computes(case):
    factory, inputs, rules, fuse = CASES[case]
    torch.manual_seed(0)
    x = inputs()
    export = {"capture": "export", "example_inputs": (x,)} if factory is TinyTransformer else {}
    gm = fxlora.rewrite(factory(), rules, fuse_siblings=fuse, **export).train()
    randomize_lora(gm)
    # a train step (gradients recorded): the lowered calls run the graph's own operators, never a merge; a site
    # with LoRA dropout keeps the graph's nodes there (its branch input is not x A^T)
    lowers = case != "functional_x_at_w_and_dropout"
    graph_out, graph_grads, graph_calls = _run(gm, x, False)
    out, grads, calls = _run(gm, x, True)
    assert not graph_calls and (calls.get("linear.branch", 0) > 0) == lowers and "linear.merged" not in calls
    torch.testing.assert_close(out, graph_out, rtol=0, atol=0)
    assert grads.keys() == graph_grads.keys() and any("lora_" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, graph_grads[name], rtol=0, atol=0, msg=name)
    # no gradient recorded: the lowered calls (eval mode: no dropout)
    gm.eval()
    with torch.no_grad():
        graph_out, _, graph_calls = _run(gm, x, False)
        out, _, calls = _run(gm, x, True)
    # (a LoRA dropout in eval mode is the identity: its sites merge too)
    assert not graph_calls and calls.get("linear.merged", 0) + calls.get("linear.branch", 0) > 0
    torch.testing.assert_close(out, graph_out, rtol=1e-5, atol=1e-6)
    code = gm.code
    assert "lora_linear_eager" not in code and "lora_linear" not in code.replace("lora_linear_h", "")  # its own graph is unchanged


def test_a_hugging_face_decoder_merges_per_call_where_no_gradient_is_recorded():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (4, 64))
    gm = fxlora.rewrite(model, [Rule("model.layers.*.self_attn.*_proj", r=4, alpha=8), Rule("model.layers.*.mlp.*_proj", r=4, alpha=8)],
                        example_inputs=(ids[:2, :16].clone(),), example_kwargs={"use_cache": False}).eval()
    randomize_lora(gm)
    with torch.inference_mode():
        gm.lower_branches = False
        expected = gm(input_ids=ids, use_cache=False).logits
        gm.lower_branches = True
        ops.counters.clear()
        out = gm(input_ids=ids, use_cache=False).logits
    assert dict(ops.counters) == {"linear.merged": 14}  # 7 sites x 2 layers, 256 tokens: merging pays
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    gm.train()
    ops.counters.clear()
    gm(input_ids=ids, use_cache=False).logits.square().mean().backward()  # a train step: the graph's operators
    assert dict(ops.counters) == {"linear.branch": 14}
    assert all(p.grad is not None for n, p in gm.named_parameters() if "lora_" in n)


def test_lora_dropout_sites_merge_in_eval_mode_and_draw_the_graphs_masks_in_train_mode():
    """A site with LoRA dropout (adapters trained with ``dropout > 0`` are common) lowers without gradients:
    in eval mode its dropout is the identity and the site merges per call like any other, eagerly and
    compiled; in train mode without gradients it runs the branch over its dropout's output, drawn where the
    graph draws it (the same masks for the same seed)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (4, 64))
    gm = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.qkv", r=2, alpha=4, dropout=0.1), Rule("head", r=2, alpha=2, dropout=0.2)],
                        capture="export", example_inputs=(ids[:, :8],))
    randomize_lora(gm)
    for training, path in ((False, "linear.merged"), (True, "linear.branch")):
        gm.train(training)
        with torch.no_grad():
            gm.lower_branches = False
            torch.manual_seed(1)
            expected = gm(ids)
            gm.lower_branches = True
            ops.counters.clear()
            torch.manual_seed(1)
            out = gm(ids)
        assert dict(ops.counters) == {path: 3}, training
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        if training:
            assert torch.equal(out, expected)
    gm.eval()
    backend = _Graphs()
    with torch.no_grad():
        compiled = torch.compile(gm, backend=backend, fullgraph=True)(ids)
        assert backend.count("addmm") == 3
        torch.testing.assert_close(compiled, gm(ids), rtol=0, atol=0)
    # a dropout hooked or swapped for another module since: its output counts, as in the graph
    drop = gm.get_submodule("blocks.0.qkv.lora_dropout")
    handle = drop.register_forward_hook(lambda m, args, out: out * 0)
    for step in ("hooked", "swapped"):
        if step == "swapped":
            handle.remove()
            parent = gm.get_submodule("blocks.0.qkv")
            parent.lora_dropout = torch.nn.Sequential(torch.nn.Dropout(0.1), _Zero()).eval()
        with torch.no_grad():
            gm.lower_branches = False
            expected = gm(ids)
            gm.lower_branches = True
            ops.counters.clear()
            torch.testing.assert_close(gm(ids), expected, rtol=1e-5, atol=1e-6, msg=step)
        assert ops.counters["linear.branch"] == 1 and ops.counters["linear.merged"] == 2, step


class _Zero(torch.nn.Module):
    def forward(self, x):
        return x * 0


def test_a_bfloat16_train_step_has_the_graphs_gradients_bit_for_bit():
    """With gradients recorded the lowered calls run the graph's operators in the graph's order, so autograd
    sums each input's gradient contributions (q, k and v read one input) in the same order: in bfloat16,
    where another order rounds differently, the gradients are the graph's exactly."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 24))
    gm = fxlora.rewrite(model, [Rule("model.layers.*.*_proj", r=4, alpha=8)], example_inputs=(ids,),
                        example_kwargs={"use_cache": False}).train()
    randomize_lora(gm)

    def step(mode):
        gm.lower_branches = mode
        gm.zero_grad(set_to_none=True)
        ops.counters.clear()
        gm(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
        return {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}, dict(ops.counters)

    (graph, graph_calls), (lowered, calls) = step(False), step(True)
    assert not graph_calls and calls == {"linear.branch": 14}
    assert graph.keys() == lowered.keys() and len(graph) == 28
    for name, grad in graph.items():
        assert torch.equal(lowered[name], grad), name


def test_auto_by_default_which_lowers_only_cuda_half_precision():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.qkv", r=2, alpha=4)])
    x = torch.randint(0, 40, (4, 24))
    assert gm.lower_branches == "auto"
    assert copy.deepcopy(gm).lower_branches == "auto" and copy.copy(gm).lower_branches == "auto"
    for module in (gm, gm.to(torch.bfloat16)):
        ops.counters.clear()
        with torch.no_grad():
            module(x)
        assert not ops.counters  # CPU: the graph itself
    assert fxlora.ops.merge_pays(4096, 2048, 2048) and not fxlora.ops.merge_pays(32, 2048, 2048)


def test_exporters_and_tracers_see_the_graph_not_the_lowering():
    torch.manual_seed(0)
    gm = _tiny([Rule("blocks.*.qkv", r=2, alpha=4)]).eval()
    randomize_lora(gm)
    gm.lower_branches = True
    x = torch.randint(0, 40, (4, 24))
    with torch.no_grad():
        expected = gm(x)
        ops.counters.clear()
        programs = [torch.export.export(gm, (x,), strict=strict) for strict in (False, True)]
        traced = torch.jit.trace(gm, (x,), check_trace=False)
    assert not ops.counters
    for program in programs:
        targets = [str(n.target) for n in program.graph.nodes]
        assert not any("lora_linear" in t or "addmm" in t for t in targets)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)


def test_torch_compile_compiles_the_forward_an_eager_call_runs():
    """``torch.compile(gm)`` compiles what an eager call of ``gm`` runs: without gradients the lowered forward
    (each site merged per call where that pays: one addmm), with gradients the graph's operators; in one
    graph each (``fullgraph=True``), compiled once per mode; a module that calls ``gm`` and is compiled
    itself traces ``gm``'s graph inline."""
    torch.manual_seed(0)
    gm = _tiny([Rule("blocks.*.qkv", r=2, alpha=4), Rule("head", r=3, alpha=3)]).train()
    randomize_lora(gm)
    x = torch.randint(0, 40, (4, 24))
    gm.lower_branches = False
    with torch.no_grad():
        graph_out = gm(x)
    gm.lower_branches = True
    backend = _Graphs()
    compiled = torch.compile(gm, backend=backend, fullgraph=True)
    with torch.no_grad():
        ops.counters.clear()
        eager_out = gm(x)
        merged = ops.counters["linear.merged"]
        assert merged > 0
        ops.counters.clear()
        out = compiled(x)
        compiled(x)
    assert len(backend.graphs) == 1 and backend.count("addmm") == merged and not ops.counters
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, graph_out, rtol=1e-4, atol=1e-5)
    # with gradients: the graph's operators (no merge), the graph's gradients
    out = compiled(x)
    assert len(backend.graphs) == 2 and backend.count("addmm") == merged
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad(set_to_none=True)
    gm.lower_branches = False
    gm(x).square().mean().backward()
    assert grads.keys() == {n for n, p in gm.named_parameters() if p.grad is not None} and grads
    for n, p in gm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    # a compiled module that calls gm traces gm's graph inline
    gm.lower_branches = True

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = gm

        def forward(self, x):
            return self.inner(x) * 2

    outer = _Graphs()
    with torch.no_grad():
        ops.counters.clear()
        torch.testing.assert_close(torch.compile(Outer(), backend=outer, fullgraph=True)(x), 2 * graph_out, rtol=1e-5, atol=1e-6)
    assert len(outer.graphs) == 1 and outer.count("addmm") == 0 and not ops.counters


def test_switching_adapters_lowers_the_new_graph():
    torch.manual_seed(0)
    gm = _tiny([Rule("blocks.*.qkv", r=2, alpha=4)], adapter="a")
    fxlora.add_adapter(gm, [Rule("blocks.*.proj", r=3, alpha=3)], "b")
    randomize_lora(gm)
    x = torch.randint(0, 40, (4, 24))
    for active in ("a", "b", ["a", "b"], None):
        fxlora.set_adapter(gm, active)
        with torch.no_grad():
            gm.lower_branches = False
            expected = gm(x)
            gm.lower_branches = True
            torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6, msg=str(active))


def test_copies_pickles_and_bad_values():
    torch.manual_seed(0)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4)])  # symbolic: it pickles
    randomize_lora(gm)
    gm.lower_branches = True
    x = torch.randn(4, 24, 8)
    with torch.no_grad():
        ops.counters.clear()
        expected = gm(x)  # builds the lowering
        lowered = ops.counters["linear.merged"] + ops.counters["linear.branch"]
        assert lowered == 3  # F.linear, x @ W and the Conv1D's addmm; the nn.Linear call stays a module call
        for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), copy.copy(gm)):
            assert other.lower_branches is True
            ops.counters.clear()
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-6)
            assert ops.counters["linear.merged"] + ops.counters["linear.branch"] == lowered
        before = {k: v.clone() for k, v in gm.state_dict().items()}
        gm.lower_branches = "yes"
        with pytest.raises(ArgumentError, match="lower_branches must be 'auto', True or False"):
            gm(x)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(64,), (4, 16)], ids=str)
def test_the_merged_call_is_within_the_ops_bound(dtype, lead):
    """``lora_linear_eager`` merging ``W + B A`` per call where no gradient is recorded (64 tokens, 24 -> 20,
    r=4: merging pays), against the float64 reference, with the op's bound for two roundings (the merged
    weight and the output); where a gradient is recorded, the branch's plain ops, outputs and gradients
    within the composite path's bound."""
    for bias, grad_weight in [(True, False), (False, True)]:
        x, W, b, A, B = make_inputs(lead, 24, 20, 4, dtype, bias=bias, grad_weight=grad_weight)
        Bs = (B.detach() * SCALE).requires_grad_()  # the lower pass hands the op the scaled B, scale 1
        tensors = [x, W, b, A, Bs]
        dy = torch.randn((*lead[:-1], lead[-1], 20), generator=torch.Generator().manual_seed(1)).to(dtype)
        (y_ref, g_ref), (y_mag, g_mag) = reference_and_magnitude(tensors, dy, 1.0, False)
        K = max(W.shape[1], W.shape[0], x.numel() // x.shape[-1])
        ops.counters.clear()
        with torch.no_grad():
            y = ops.lora_linear_eager(x, W, b, A, Bs, 1.0)
        assert ops.counters["linear.merged"] == 1 and not ops.counters["linear.branch"]
        assert_within_bound(y, y_ref, y_mag, dtype=dtype, path="merged", K=K, what="output")
        ops.counters.clear()
        y = ops.lora_linear_eager(x, W, b, A, Bs, 1.0)
        assert ops.counters["linear.branch"] == 1 and not ops.counters["linear.merged"]
        wanted = [t for t in tensors if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, wanted, dy)
        assert_within_bound(y, y_ref, y_mag, dtype=dtype, path="composite", K=K, what="output")
        for g, ref, mag in zip(grads, g_ref, g_mag):
            assert_within_bound(g, ref, mag, dtype=dtype, path="composite", K=K, what="a gradient")


def test_under_autocast_the_lowered_branch_casts_as_the_graph_does():
    """Mixed precision (float32 weights, bfloat16 autocast), no gradient recorded: the lowered call runs the
    branch's plain ops, which autocast casts as it casts the graph's, so the outputs are the graph's bit for bit."""
    torch.manual_seed(0)
    gm = _tiny([Rule("blocks.*.qkv", r=2, alpha=4), Rule("head", r=3, alpha=3)]).eval()
    randomize_lora(gm)
    x = torch.randint(0, 40, (4, 24))
    results = []
    for mode in (False, True):
        gm.lower_branches = mode
        ops.counters.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = gm(x)
        results.append((out, dict(ops.counters)))
    (graph_out, _), (out, calls) = results
    assert out.dtype == graph_out.dtype == torch.bfloat16
    assert calls == {"linear.branch": 3}
    torch.testing.assert_close(out, graph_out, rtol=0, atol=0)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] = self.ops.get(str(func.overloadpacket), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [96, 1], ids=["merged", "branch"])
def test_the_lowered_forward_runs_fewer_operators_where_it_merges(tokens):
    """Per site, the graph runs the base linear, x A^T, the scale on B, B's linear and the add.  Lowered, with
    no gradient recorded, where merging pays: one addmm making W + s B A (the scale is its alpha) and the base
    linear.  Where it does not pay (one token): the graph's own operators."""
    torch.manual_seed(0)
    gm = _tiny([Rule("blocks.*.qkv", r=2, alpha=4), Rule("head", r=3, alpha=3)]).eval()
    randomize_lora(gm)
    sites = 3
    x = torch.randint(0, 40, (1, tokens) if tokens == 1 else (4, 24))
    counts, outs = {}, {}
    for mode in (False, True):
        gm.lower_branches = mode
        ops.counters.clear()
        with torch.no_grad(), _CountOps() as mode_ops:
            outs[mode] = gm(x)
        counts[mode] = mode_ops.ops
        if mode:
            assert dict(ops.counters) == ({"linear.merged": sites} if tokens > 1 else {"linear.branch": sites})
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-6)
    graph, lowered = counts[False], counts[True]
    if tokens == 1:  # nothing the graph does not run
        assert all(n <= graph.get(op, 0) for op, n in lowered.items()), (lowered, graph)
        return
    assert graph.get("aten.mul", 0) - lowered.get("aten.mul", 0) == sites  # the scale is the GEMM's alpha
    assert graph.get("aten.add", 0) - lowered.get("aten.add", 0) == sites  # nothing added after the GEMMs
    assert sum(lowered.values()) <= sum(graph.values()) - 3 * sites


def _binding_cases():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    m, n = torch.randn(3, 4, generator=g), torch.randn(4, 6, generator=g)
    q = torch.randn(1, 2, 3, 4, generator=g)
    aten = torch.ops.aten
    return {
        aten.linear.default: (x, w, b), aten.addmm.default: (torch.randn(3, 6, generator=g), m, n),
        aten.matmul.default: (x, n), aten.mm.default: (m, n), aten.bmm.default: (x, torch.randn(2, 4, 2, generator=g)),
        aten.add.Tensor: (x, 0.5), aten.sub.Tensor: (x, x.flip(0)), aten.mul.Tensor: (x, 2.0), aten.div.Tensor: (x, 3.0),
        aten.neg.default: (x,), aten.rsqrt.default: (x.abs() + 1,), aten.sqrt.default: (x.abs(),),
        aten.pow.Tensor_Scalar: (x, 2), aten.mean.dim: (x, [-1], True), aten.exp.default: (x,), aten.cos.default: (x,),
        aten.sin.default: (x,), aten.tanh.default: (x,), aten.sigmoid.default: (x,), aten.silu.default: (x,),
        aten.gelu.default: (x,), aten.softmax.int: (x, -1), aten.layer_norm.default: (x, [4], torch.ones(4), torch.zeros(4), 1e-5),
        aten.embedding.default: (w, torch.tensor([[0, 4], [2, 1]])), aten.dropout.default: (x, 0.0, False),
        aten.scaled_dot_product_attention.default: (q, q, q, None, 0.0, True),
        aten.view.default: (x, [6, 4]), aten.reshape.default: (x, [4, 6]), aten.transpose.int: (x, 1, 2),
        aten.permute.default: (x, [2, 0, 1]), aten.unsqueeze.default: (x, 1), aten.select.int: (x, 1, 2),
        aten.cat.default: ([x, x], -1), aten.to.dtype: (x, torch.float64),
    }


def test_every_binding_a_lowered_graph_calls_computes_what_its_overload_computes():
    cases = _binding_cases()
    missing = set(ops.BINDINGS) - set(cases) - {torch.ops.aten._assert_tensor_metadata.default}
    assert not missing, missing
    for overload, args in cases.items():
        expected, got = overload(*args), ops.BINDINGS[overload](*args)
        assert got.dtype == expected.dtype and got.shape == expected.shape, overload
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=str(overload))
    check, x = ops.BINDINGS[torch.ops.aten._assert_tensor_metadata.default], torch.zeros(2, 3)
    for args, kwargs in [((x,), {"dtype": torch.float32, "device": x.device, "layout": torch.strided}),
                         ((x, None, None, torch.float32), {}), ((x, [2, 3], [3, 1]), {})]:
        torch.ops.aten._assert_tensor_metadata.default(*args, **kwargs)  # both accept what the op accepts
        check(*args, **kwargs)
    for args, kwargs in [((x,), {"dtype": torch.float64}), ((x, None, None, torch.int64), {}), ((x, [3, 2]), {})]:
        with pytest.raises(RuntimeError):
            torch.ops.aten._assert_tensor_metadata.default(*args, **kwargs)
        with pytest.raises(fxlora.errors.TraceError, match="capture fixes the dtypes"):
            check(*args, **kwargs)
    kw = {"approximate": "tanh"}
    torch.testing.assert_close(ops.BINDINGS[torch.ops.aten.gelu.default](cases[torch.ops.aten.gelu.default][0], **kw),
                               torch.ops.aten.gelu.default(cases[torch.ops.aten.gelu.default][0], **kw), rtol=0, atol=0)


def test_a_lowered_capture_converted_after_capture_names_the_problem():
    """A torch.export capture fixes the dtypes of the conversions in its graph (its ``_assert_tensor_metadata``
    nodes check them).  Lowered, the check is a Python function raising fxlora's TraceError (a RuntimeError, as
    the graph's own check raises)."""
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=128)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    gm = fxlora.rewrite(transformers.LlamaForCausalLM(cfg), [Rule("model.layers.*.self_attn.q_proj", r=4, alpha=8)],
                        example_inputs=(ids[:, :8].clone(),), example_kwargs={"use_cache": False}).eval()
    if not any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in gm.graph.nodes):
        pytest.skip("this torch's export records no dtype checks")
    gm.lower_branches = True
    with torch.no_grad():
        gm(input_ids=ids, use_cache=False)  # lowered, float32 as captured
    gm.to(torch.float64)
    for mode in (False, True):
        gm.lower_branches = mode
        with torch.no_grad(), pytest.raises(RuntimeError) as raised:
            gm(input_ids=ids, use_cache=False)
        # lowered, the top-level graph's checks are fxlora's; torch 2.11's export keeps the rotary embedding's
        # autocast region as a submodule (a higher-order op's body), whose checks stay PyTorch's
        assert (mode and isinstance(raised.value, fxlora.errors.TraceError)
                and "capture fixes the dtypes" in str(raised.value)) or "dtype mismatch" in str(raised.value)


def test_fused_siblings_merge_per_call_without_gradients_and_share_their_shrink_in_a_train_step():
    """``fuse_siblings=True`` (q, k, v share one shrink, gate and up another): a forward that records no gradient
    lowers each sibling over its own factor, so it merges per call like any other site and the shared shrink is
    gone; a train step keeps the shared shrink, and the graph's gradients bit for bit."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=128)
    ids = torch.randint(0, 128, (4, 64))
    gm = fxlora.rewrite(transformers.LlamaForCausalLM(cfg), [Rule("model.layers.*.*.*_proj", r=4, alpha=8)],
                        example_inputs=(ids[:2, :16].clone(),), example_kwargs={"use_cache": False}, fuse_siblings=True)
    randomize_lora(gm)
    shared = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "split"]
    assert len(shared) == 4  # q, k, v and gate, up of each layer
    gm.eval()
    with torch.inference_mode():
        gm.lower_branches = False
        expected = gm(input_ids=ids, use_cache=False).logits
        gm.lower_branches = True
        ops.counters.clear()
        out = gm(input_ids=ids, use_cache=False).logits
    assert dict(ops.counters) == {"linear.merged": 14}  # every site, the siblings too
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    backend = _Graphs()
    with torch.no_grad():  # compiled: one addmm per site, no shared shrink
        compiled = torch.compile(gm, backend=backend, fullgraph=True)(input_ids=ids, use_cache=False).logits
    assert backend.count("addmm") == 14 and backend.count("split") == 0
    torch.testing.assert_close(compiled, out, rtol=0, atol=0)
    gm.train()

    def step(mode):
        gm.lower_branches = mode
        gm.zero_grad(set_to_none=True)
        ops.counters.clear()
        logits = gm(input_ids=ids, use_cache=False).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}, dict(ops.counters)

    graph_out, graph_grads, graph_calls = step(False)
    got, grads, calls = step(True)
    assert not graph_calls and calls == {"linear.branch": 4}  # o and down lower; the siblings keep the graph's nodes
    torch.testing.assert_close(got, graph_out, rtol=0, atol=0)
    assert grads.keys() == graph_grads.keys() and sum("lora_" in n for n in grads) == 28
    for name, grad in grads.items():
        torch.testing.assert_close(grad, graph_grads[name], rtol=0, atol=0, msg=name)
    assert sum(n.op == "call_method" and n.target == "split" for n in gm.graph.nodes) == 4  # its own graph is unchanged
