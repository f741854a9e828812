"""Outside review of f3f0fe6: ``torch.compile(gm)`` compiles what an eager call of ``gm`` runs.

The wrapper ``LoraGraphModule.forward`` is registered with ``torch._dynamo.eval_frame.skip_code``, so that
``torch.compile(gm)`` runs it as Python (``_choose_forward``, a ``torch._dynamo.disable``d function, picks the
folded module, the lowered forward or the graph) and compiles the forward it calls; a compiled parent module
traces ``gm``'s forward inline (``torch.compiler.is_compiling()``) and sees the graph; exporters and tracers
see the graph.

Claims checked here, on CPU with ``gm.lower_branches = True`` (and False):
(1) ``torch.compile(gm)`` (any backend, ``fullgraph=True``, ``gm.compile()``) compiles what an eager call
    runs, same outputs and gradients, one graph per grad mode, no recompiles on repeated calls, no breaks;
(2) a compiled parent sees ``gm``'s graph inline, ``fullgraph=True`` works;
(3) ``torch.export`` (strict and not), ``torch.jit.trace`` and ``torch.fx.symbolic_trace`` see the graph;
(4) eager behaviour is unchanged.

What held is tested plainly.  Two bugs the review found are fixed since and tested plainly (a code object
shared by every large module's wrapper, so one recompile limit for all of them; pickling after
``gm.compile()``).  What did not hold is ``xfail(strict=True)`` with the reason; these are:

* a ``merge_on_eval`` module compiled in eval mode recompiles at every train()->eval() cycle (and after every
  change of a LoRA factor): each fold is a new ``GraphModuleImpl`` class running one shared code object,
  Dynamo guards on ``type(self)``; the 9th fold hits ``recompile_limit`` (8): ``FailOnRecompileLimitHit``
  with ``fullgraph=True``, silently uncompiled without it;
* ``dynamic=True`` does not give one graph: the lowered forward guards on ``merge_pays(tokens, ...)``;
* ``merge_on_eval`` in eval mode: a compiled parent with ``fullgraph=True``, strict ``torch.export``,
  ``torch.jit.trace`` and ``torch.fx.symbolic_trace`` fail (``merged_module()`` runs under the tracer;
  pre-existing).

The tests hold on the code at f3f0fe6 and on the working tree as it stood during this review (which changed
``_plain_ops_only`` and ``_choose``): they compare a compiled call with the eager call, not with a fixed
decision.
"""

from __future__ import annotations

import copy
import os
import pickle
import socket

import fxlora
import pytest
import torch
import torch._dynamo
import transformers
from fxlora import Rule, ops
from fxlora.zoo import GPT2, GPT2Config
from torch._dynamo.utils import counters

from helpers import CompiledGraphs as _Graphs, Functional, TinyTransformer, randomize_lora

IDS = torch.randint(0, 40, (4, 24), generator=torch.Generator().manual_seed(0))
RULES = [Rule("blocks.*.qkv", r=2, alpha=4), Rule("head", r=3, alpha=3)]


# --------------------------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    ops.counters.clear()
    yield
    torch._dynamo.reset()


_CAPTURED = {}


def _tiny(lower=True, **kw):
    """TinyTransformer captured with torch.export (its linear bases lower), LoRA factors non-zero; without
    keywords a deep copy of one capture (a new LoraGraphModule, its own generated code), for time."""
    if kw or "base" not in _CAPTURED:
        torch.manual_seed(0)
        gm = fxlora.rewrite(TinyTransformer(), RULES, capture="export", example_inputs=(IDS,), **kw)
        randomize_lora(gm)
        if kw:
            gm.lower_branches = lower
            return gm
        _CAPTURED["base"] = gm
    gm = copy.deepcopy(_CAPTURED["base"])
    gm.lower_branches = lower
    return gm


def _gpt2(n_layer=2, **kw):
    """fxlora.zoo's GPT-2 (symbolic capture), small; from 2 layers its generated forward has 128 slots or more,
    so fxlora calls it through stack_chunks.safe_forward."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=n_layer, n_head=2, dropout=0.0))
    return fxlora.rewrite(model, [Rule("*.attn.c_attn", r=2, alpha=4)], **kw)


def _grads(gm):
    return {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}


def _eager(gm, *args, grad=False, **kwargs):
    """Output (and gradients of the loss ``square().mean()``) of an eager call, and the eager counters."""
    gm.zero_grad(set_to_none=True)
    ops.counters.clear()
    with torch.set_grad_enabled(grad):
        out = gm(*args, **kwargs)
        out = getattr(out, "logits", out)
    calls = dict(ops.counters)
    if grad and out.requires_grad:
        out.square().mean().backward()
    return out.detach(), _grads(gm), calls


def _compiled(compiled, gm, *args, grad=False, **kwargs):
    """Output (and gradients) of a compiled call, which runs no eager lowered call (nothing counted)."""
    gm.zero_grad(set_to_none=True)
    ops.counters.clear()
    with torch.set_grad_enabled(grad):
        out = compiled(*args, **kwargs)
        out = getattr(out, "logits", out)
    assert not ops.counters, dict(ops.counters)
    if grad and out.requires_grad:
        out.square().mean().backward()
    return out.detach(), _grads(gm)


def _assert_grads_equal(got, expected, atol=0.0):
    assert got.keys() == expected.keys() and any("lora_" in n for n in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0 if atol == 0 else 1e-5, atol=atol, msg=name)


def _no_breaks():
    assert not counters["graph_break"], dict(counters["graph_break"])


# --------------------------------------------------------------------------------------------- #
# (1) torch.compile(gm) compiles what an eager call runs
# --------------------------------------------------------------------------------------------- #


def test_compiled_module_runs_the_eager_choice_once_per_grad_mode():
    """(aot_eager: test_zoo_gpt2_symbolic_capture_compiled; inductor: test_inductor_on_the_tiniest_model)"""
    gm = _tiny()
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs, fullgraph=True)
    eager_out, _, calls = _eager(gm, IDS)
    assert calls == {"linear.merged": 3}
    for _ in range(2):
        out, _ = _compiled(compiled, gm, IDS)
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    eager_out, eager_grads, calls = _eager(gm, IDS, grad=True)
    assert calls == {"linear.branch": 3}
    for _ in range(2):
        out, grads = _compiled(compiled, gm, IDS, grad=True)
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
        _assert_grads_equal(grads, eager_grads)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one per grad mode, no recompile
    _no_breaks()
    assert len(graphs.graphs) == 2 and graphs.count("addmm") == 3  # the no-grad graph merges each site


def test_inductor_on_the_tiniest_model():
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    gm = fxlora.rewrite(One(), [Rule("fc", r=2, alpha=4)], capture="export", example_inputs=(x,))
    randomize_lora(gm)
    gm.lower_branches = True
    compiled = torch.compile(gm, backend="inductor", fullgraph=True)
    eager_out, _, calls = _eager(gm, x)
    assert calls == {"linear.merged": 1}
    for _ in range(2):
        torch.testing.assert_close(_compiled(compiled, gm, x)[0], eager_out, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1
    _no_breaks()  # (a compiled train step under inductor costs ~8 s of C++ compilation cold: aot_eager covers it)


def test_gm_compile_method_compiles_the_lowered_forward():
    gm = _tiny()
    graphs = _Graphs()
    eager_out, _, _ = _eager(gm, IDS)
    gm.compile(backend=graphs, fullgraph=True)
    ops.counters.clear()
    with torch.no_grad():
        out = gm(IDS)
        gm(IDS)
    assert not ops.counters and len(graphs.graphs) == 1 and graphs.count("addmm") == 3
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)


def test_lower_branches_toggled_between_compiled_calls():
    gm = _tiny(lower=False)
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs, fullgraph=True)
    for lower, new_graphs, addmm in ((False, 1, 0), (True, 2, 3), (False, 2, 3), (True, 2, 3)):
        gm.lower_branches = lower
        eager_out, _, calls = _eager(gm, IDS)
        assert bool(calls) == lower
        out, _ = _compiled(compiled, gm, IDS)
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
        assert (len(graphs.graphs), graphs.count("addmm")) == (new_graphs, addmm), lower
    # a bad value raises fxlora's error, as eagerly (before f3f0fe6 a compiled call ignored it); with
    # fullgraph=True torch.fx's GraphModule.__call__ walks the traceback with a generator, which Dynamo refuses
    # (Unsupported 'Attempt to trace generator', any fx GraphModule does that), hence fullgraph=False here
    gm.lower_branches = "yes"
    for call in (gm, torch.compile(gm, backend="eager")):
        with pytest.raises(fxlora.ArgumentError, match="lower_branches must be"):
            call(IDS)


def test_set_adapter_and_disable_adapter_between_compiled_calls():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.qkv", r=2, alpha=4)], capture="export",
                        example_inputs=(IDS,), adapter="a")
    fxlora.add_adapter(gm, [Rule("head", r=3, alpha=3)], "b")
    randomize_lora(gm)
    gm.lower_branches = True
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    outs = []
    for active in ("a", "b", ["a", "b"], None):
        fxlora.set_adapter(gm, active)
        eager_out, _, _ = _eager(gm, IDS)
        out, _ = _compiled(compiled, gm, IDS)
        torch.testing.assert_close(out, eager_out, rtol=0, atol=0, msg=str(active))
        outs.append(out)
    assert len({tuple(o.flatten()[:64].tolist()) for o in outs}) == 4  # four different functions
    fxlora.set_adapter(gm, "a")
    with fxlora.disable_adapter(gm):
        torch.testing.assert_close(_compiled(compiled, gm, IDS)[0], outs[3], rtol=0, atol=0)
    _no_breaks()


def test_train_eval_toggles_with_lora_dropout_follow_the_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 24, 8)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4, dropout=0.5)], capture="export", example_inputs=(x,))
    randomize_lora(gm)
    gm.lower_branches = True
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs, fullgraph=True)
    for mode in (False, True, False, True):
        gm.train(mode)
        torch.manual_seed(1)
        out, _ = _compiled(compiled, gm, x)
        torch.manual_seed(1)
        again, _ = _compiled(compiled, gm, x)
        gm.eval()
        eager_eval, _, _ = _eager(gm, x)
        gm.train(mode)
        if mode:  # dropout on: not eval's output, the same with the same seed
            assert not torch.allclose(out, eager_eval) and torch.equal(out, again)
        else:
            torch.testing.assert_close(out, eager_eval, rtol=0, atol=0)
    assert len(graphs.graphs) == 2  # one per mode, no recompile on toggling back
    _no_breaks()


def test_no_grad_inference_mode_and_autocast():
    gm = _tiny()
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs, fullgraph=True)
    with torch.inference_mode():
        expected = gm(IDS)
        torch.testing.assert_close(compiled(IDS), expected, rtol=0, atol=0)
        compiled(IDS)
    assert len(graphs.graphs) == 1 and graphs.count("addmm") == 3
    # autocast: the eager lowered calls run the graph's operators (no merge), so does the compiled graph
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ops.counters.clear()
        expected = gm(IDS)
        assert dict(ops.counters) == {"linear.branch": 3}
        out = compiled(IDS)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(graphs.graphs) == 2 and graphs.count("addmm") == 3  # the autocast graph has no merge


def test_freezing_every_parameter_after_a_compiled_train_call_is_followed():
    """requires_grad changed between compiled calls: the compiled call follows the eager one (whether that
    merges with gradients enabled and nothing requiring one is the eager path's decision: the compiled graph
    has as many merges as the eager call counted)."""
    gm = _tiny()
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs, fullgraph=True)
    assert compiled(IDS).requires_grad and graphs.count("addmm") == 0
    for p in gm.parameters():
        p.requires_grad_(False)
    for grad in (True, False):
        expected, _, calls = _eager(gm, IDS, grad=grad)
        out, _ = _compiled(compiled, gm, IDS, grad=grad)
        assert not out.requires_grad
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        last = graphs.graphs[-1]
        assert sum("addmm" in str(n.target) for n in last.graph.nodes) == calls.get("linear.merged", 0), grad
    assert calls == {"linear.merged": 3}


def test_dynamic_shapes_follow_the_merge_decision():
    """dynamic=True: each shape gets the eager call's values (merged at 8 tokens and more here, the branch
    below); the graph itself (lower_branches=False) compiles once for all of them (see the xfail
    test_dynamic_true_compiles_one_no_grad_graph for the lowered forward)."""
    shapes = ((4, 24), (2, 12), (2, 3))
    for lower, most in ((True, 2), (False, 1)):
        torch._dynamo.reset()
        gm = _tiny(lower=lower)
        graphs = _Graphs()
        compiled = torch.compile(gm, backend=graphs, fullgraph=True, dynamic=True)
        for batch, seq in shapes:
            x = IDS[:batch, :seq].clone()
            expected, _, _ = _eager(gm, x)
            torch.testing.assert_close(_compiled(compiled, gm, x)[0], expected, rtol=0, atol=0, msg=str((batch, seq)))
        assert len(graphs.graphs) <= most, lower
    _no_breaks()


def test_hooks_on_the_compiled_module_run_every_call():
    gm = _tiny()
    seen = []
    gm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    gm.register_forward_hook(lambda m, args, out: out * 3)
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    expected, _, _ = _eager(gm, IDS)
    for _ in range(2):
        torch.testing.assert_close(_compiled(compiled, gm, IDS)[0], expected, rtol=0, atol=0)
    assert len(seen) == 3


def test_functional_call_on_the_compiled_module():
    gm = _tiny()
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    params = {n: p.detach() * 1.5 for n, p in gm.named_parameters()}
    with torch.no_grad():
        expected = torch.func.functional_call(gm, params, (IDS,))
        out = torch.func.functional_call(compiled, params, (IDS,))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(compiled(IDS), gm(IDS), rtol=0, atol=0)  # its own parameters again
    assert not torch.allclose(out, gm(IDS))


def test_merge_on_eval_compiled_in_eval_mode_sees_a_factor_changed_in_place():
    gm = _tiny(merge_on_eval=True).eval()
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    factor = gm.get_parameter(fxlora.lora_parameter_names(gm)[0])
    before = None
    for _ in range(3):  # below the recompile limit (see the xfail below)
        expected, _, calls = _eager(gm, IDS)
        assert not calls  # the fold
        out, _ = _compiled(compiled, gm, IDS)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert before is None or not torch.equal(out, before)
        before = out
        with torch.no_grad():
            factor.add_(0.5)
    gm.train()
    expected, _, calls = _eager(gm, IDS)
    assert calls == {"linear.merged": 3}  # train mode: the lowered forward
    torch.testing.assert_close(_compiled(compiled, gm, IDS)[0], expected, rtol=0, atol=0)


def test_served_module_compiled():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), [Rule("blocks.*.qkv", r=2, alpha=4)], adapter="a")
    fxlora.add_adapter(gm, [Rule("head", r=3, alpha=3)], "b")
    randomize_lora(gm)
    server = fxlora.serve(gm).eval()
    server.lower_branches = True
    compiled = torch.compile(server, backend="eager")
    ids = torch.tensor([0, 1, -1, 0])
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS, ids), server(IDS, ids), rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="adapter_ids out of range"):
            compiled(IDS, torch.tensor([0, 1, 3, 0]))


def test_torch_dynamo_reset_keeps_running_the_wrapper_as_python():
    gm = _tiny()
    expected, _, _ = _eager(gm, IDS)
    for _ in range(2):
        graphs = _Graphs()
        torch.testing.assert_close(_compiled(torch.compile(gm, backend=graphs, fullgraph=True), gm, IDS)[0], expected,
                                   rtol=0, atol=0)
        assert graphs.count("addmm") == 3
        torch._dynamo.reset()


def test_copies_and_pickles_of_a_compiled_module():
    torch.manual_seed(0)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4)])  # symbolic: it pickles
    randomize_lora(gm)
    gm.lower_branches = True
    x = torch.randn(4, 24, 8)
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    expected, _ = _compiled(compiled, gm, x)
    # (a deep copy of the OptimizedModule is a copy of gm, uncompiled: torch forwards __deepcopy__)
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), copy.deepcopy(compiled)):
        assert other.lower_branches is True
        out, _, calls = _eager(other, x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert calls == {"linear.merged": 3}
        graphs = _Graphs()
        torch.testing.assert_close(_compiled(torch.compile(other, backend=graphs), other, x)[0], expected, rtol=0, atol=0)
        assert graphs.count("addmm") == 3


# --------------------------------------------------------------------------------------------- #
# models: a symbolic capture (zoo GPT-2, through safe_forward) and torch.export captures of HF models
# --------------------------------------------------------------------------------------------- #


def test_zoo_gpt2_symbolic_capture_compiled():
    gm = _gpt2(n_layer=2)
    randomize_lora(gm)
    gm.lower_branches = True
    assert fxlora.graph_module._lowered_forward(gm).__name__ == "forward"
    assert fxlora.graph_module._lowered_forward(gm).__code__.co_name == "safe_forward"  # a large frame
    x = torch.randint(0, 64, (4, 16))
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    expected, _, calls = _eager(gm, x)
    assert calls == {"linear.merged": 2}
    torch.testing.assert_close(_compiled(compiled, gm, x)[0], expected, rtol=0, atol=0)
    expected, eager_grads, _ = _eager(gm, x, grad=True)
    out, grads = _compiled(compiled, gm, x, grad=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    _assert_grads_equal(grads, eager_grads)
    assert counters["stats"]["unique_graphs"] == 2
    _no_breaks()


HF_IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_llama():
    """A tiny Llama captured with torch.export, every projection adapted (7 sites), in train mode."""
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=128)
    torch.manual_seed(0)
    gm = fxlora.rewrite(transformers.LlamaForCausalLM(cfg), [Rule("model.layers.*.*_proj", r=4, alpha=8)],
                        example_inputs=(HF_IDS[:, :8].clone(),), example_kwargs={"use_cache": False}).train()
    randomize_lora(gm)
    return gm


def test_hugging_face_llama_export_capture_compiled(hf_llama):
    gm, sites = hf_llama, 7
    gm.lower_branches = True
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs, fullgraph=True)
    expected, _, calls = _eager(gm, input_ids=HF_IDS, use_cache=False)
    assert calls == {"linear.merged": sites}
    torch.testing.assert_close(_compiled(compiled, gm, input_ids=HF_IDS, use_cache=False)[0], expected, rtol=0, atol=0)
    expected, eager_grads, _ = _eager(gm, input_ids=HF_IDS, use_cache=False, grad=True)
    out, grads = _compiled(compiled, gm, input_ids=HF_IDS, use_cache=False, grad=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    _assert_grads_equal(grads, eager_grads)
    assert len(graphs.graphs) == 2
    _no_breaks()


def test_a_converted_capture_raises_the_eager_error_when_compiled(hf_llama):
    if not any(n.target is torch.ops.aten._assert_tensor_metadata.default for n in hf_llama.graph.nodes):
        pytest.skip("this torch's export records no dtype checks")
    gm = copy.deepcopy(hf_llama).eval().to(torch.float64)
    gm.lower_branches = True
    compiled = torch.compile(gm, backend="eager")  # fullgraph=True: Dynamo's Unsupported 'Observed exception'
    # the eager error: fxlora's TraceError from the lowered dtype checks, or PyTorch's RuntimeError where the
    # first failing check is inside a higher-order op's body (torch 2.11's export keeps the rotary embedding's
    # autocast region as a submodule, which the lowering leaves as it is: docs/performance.md)
    with torch.no_grad(), pytest.raises((fxlora.TraceError, RuntimeError)) as eager:
        gm(input_ids=HF_IDS, use_cache=False)
    if isinstance(eager.value, fxlora.TraceError):
        assert "capture fixes the dtypes" in str(eager.value)
    with torch.no_grad(), pytest.raises(type(eager.value)) as got:
        compiled(input_ids=HF_IDS, use_cache=False)
    first = str(eager.value).splitlines()[0]
    if not isinstance(eager.value, fxlora.TraceError):
        # PyTorch's own check, which Dynamo runs on fake tensors while compiling: the fake kernel's message names
        # the dtypes as torch.float32 / torch.float64 where the eager kernel says Float / double (torch 2.11)
        first = first.split(" Expected")[0]
    assert first in str(got.value)


# --------------------------------------------------------------------------------------------- #
# (2) a compiled parent traces gm's graph inline; wrappers
# --------------------------------------------------------------------------------------------- #


class _Outer(torch.nn.Module):
    def __init__(self, inner, checkpoint=False):
        super().__init__()
        self.inner = inner
        self.checkpoint = checkpoint

    def forward(self, x):
        if self.checkpoint:
            return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False) * 2
        return self.inner(x) * 2


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_compiled_parent_traces_the_graph_inline(checkpoint):
    gm = _tiny()
    lowered_grads = _eager(gm, IDS, grad=True)[1]
    gm.lower_branches = False
    graph_out, graph_grads, _ = _eager(gm, IDS, grad=True)
    assert lowered_grads.keys() == graph_grads.keys()
    gm.lower_branches = True
    graphs = _Graphs()
    outer = _Outer(gm, checkpoint)
    compiled = torch.compile(outer, backend=graphs, fullgraph=True)
    with torch.no_grad():
        ops.counters.clear()
        torch.testing.assert_close(compiled(IDS), 2 * graph_out, rtol=1e-5, atol=1e-6)
    gm.zero_grad(set_to_none=True)
    compiled(IDS).div(2).square().mean().backward()
    _assert_grads_equal(_grads(gm), graph_grads, atol=1e-6)
    assert not ops.counters and graphs.count("addmm") == 0 and len(graphs.graphs) == 2
    if checkpoint:
        return
    # a compiled function calling gm too
    graphs = _Graphs()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(lambda x: gm(x) + 1, backend=graphs, fullgraph=True)(IDS), graph_out + 1,
                                   rtol=1e-5, atol=1e-6)
    assert graphs.count("addmm") == 0 and not ops.counters


def test_ddp_with_one_gloo_process_then_compiled():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available():
        pytest.skip("no torch.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        gm = _tiny()
        expected, eager_grads, _ = _eager(gm, IDS, grad=True)
        compiled = torch.compile(DistributedDataParallel(gm), backend="eager")
        out, grads = _compiled(compiled, gm, IDS, grad=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        _assert_grads_equal(grads, eager_grads)
        expected, _, _ = _eager(gm, IDS)
        torch.testing.assert_close(_compiled(compiled, gm, IDS)[0], expected, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- #
# (3) exporters and tracers see the graph, also after a compiled call
# --------------------------------------------------------------------------------------------- #


def test_exporters_and_tracers_after_a_compiled_call_see_the_graph():
    gm = _tiny()
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    with torch.no_grad():
        expected = compiled(IDS)
        ops.counters.clear()
        programs = [torch.export.export(gm, (IDS,), strict=strict) for strict in (False, True)]
        traced = torch.jit.trace(gm, (IDS,), check_trace=False)
        symbolic = torch.fx.symbolic_trace(gm)
        assert not ops.counters
        for program in programs:
            targets = [str(n.target) for n in program.graph.nodes]
            assert not any("addmm" in t or "lora_linear" in t for t in targets)
            torch.testing.assert_close(program.module()(IDS), expected, rtol=1e-5, atol=1e-6)
        assert not any("addmm" in str(n.target) or "eager" in str(n.target) for n in symbolic.graph.nodes)
        torch.testing.assert_close(symbolic(IDS), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(traced(IDS), expected, rtol=1e-5, atol=1e-6)
        assert not ops.counters


# --------------------------------------------------------------------------------------------- #
# bugs found (xfail, strict)
# --------------------------------------------------------------------------------------------- #


@pytest.mark.xfail(strict=True, raises=torch._dynamo.exc.FailOnRecompileLimitHit, reason=(
    "merge_on_eval compiled in eval mode recompiles at every train()->eval() cycle, nothing changed (and after "
    "any in-place change of a LoRA factor): train() drops the fold, the next eval call builds a new one, a "
    "GraphModule of a new class (GraphModuleImpl) running the one generated code object all folds of this graph "
    "share; Dynamo guards on ___check_type_id(self), so each fold is one more cache entry of that code: the 9th "
    "cycle exceeds recompile_limit (8) and fullgraph=True raises FailOnRecompileLimitHit (without fullgraph "
    "the eval forward silently stops being compiled)"))
def test_merge_on_eval_fullgraph_survives_nine_train_eval_cycles():
    gm = _tiny(merge_on_eval=True)
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    for _ in range(9):
        gm.train()
        gm.eval()
        with torch.no_grad():
            compiled(IDS)


def test_switching_between_two_adapters_of_a_compiled_large_module_keeps_compiling():
    """Found by the review, fixed since: forwards of 128 frame slots or more are called through stack_chunks.stack_safe's safe_forward, one code object for every graph of every fxlora module (lowered forwards and graphs alike); Dynamo compiles that frame and caches per code object, so each graph (each set_adapter makes one, each module has its own) is one more entry of one shared cache: the 9th exceeds recompile_limit (8; 2 here, for time: the 3rd), after which that code runs run-only and no further fxlora module is compiled in the process, silently (with fullgraph=True that call raises FailOnRecompileLimitHit); a plain fx GraphModule has a code object per graph; pre-existing: before f3f0fe6 the shared code was the forward wrapper's"""
    gm = _gpt2(n_layer=2, adapter="a")
    fxlora.add_adapter(gm, [Rule("*.attn.c_attn", r=2, alpha=4)], "b")
    randomize_lora(gm)
    gm.lower_branches = True
    x = torch.randint(0, 64, (2, 8))
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        for i in range(3):
            fxlora.set_adapter(gm, "ab"[i % 2])  # a new graph each time: a new compile
            torch.testing.assert_close(compiled(x), gm(x), rtol=0, atol=0)
            assert len(graphs.graphs) == i + 1, f"switch {i} was not compiled"


@pytest.mark.xfail(strict=True, reason=(
    "dynamic=True does not give one graph per grad mode: the lowered forward's lora_linear_eager branches on "
    "merge_pays(tokens, in, out) and Dynamo guards on it, so a compiled no-grad forward recompiles whenever the "
    "token count crosses a site's threshold (one graph per merge regime: up to one per distinct site shape, "
    "plus one); lower_branches=False compiles one graph for all of these shapes"))
def test_dynamic_true_compiles_one_no_grad_graph():
    gm = _tiny()
    graphs = _Graphs()
    compiled = torch.compile(gm, backend=graphs, fullgraph=True, dynamic=True)
    for seq in (12, 3, 20):  # 24, 6 and 40 tokens: merge_pays at 8 tokens and more, here
        _compiled(compiled, gm, IDS[:2, :seq].clone())
    assert len(graphs.graphs) == 1


@pytest.mark.xfail(strict=True, raises=torch._dynamo.exc.Unsupported, reason=(
    "a compiled parent calling a merge_on_eval module in eval mode: Dynamo traces gm's forward inline, which "
    "calls self.merged_module() (the fold cache: _stamp, is_inference(), data_ptr, bit comparisons) under "
    "the tracer; fullgraph=True raises Unsupported 'Encountered tensor.is_inference() during tracing' "
    "(pre-existing)"))
def test_a_compiled_parent_calls_a_merge_on_eval_module_in_eval_mode():
    gm = _tiny(merge_on_eval=True).eval()
    expected, _, _ = _eager(gm, IDS)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(_Outer(gm), backend="eager", fullgraph=True)(IDS), 2 * expected,
                                   rtol=0, atol=0)


@pytest.mark.xfail(strict=True, reason=(
    "exporters and tracers of a merge_on_eval module in eval mode run merged_module() under the tracer: strict "
    "torch.export raises Unsupported (tensor.is_inference()), torch.jit.trace an internal assert (the fold "
    "cache's bit comparison is traced), torch.fx.symbolic_trace a NameError (the fold is not a submodule); "
    "non-strict torch.export works (pre-existing)"))
@pytest.mark.parametrize("tracer", ["export_strict", "jit_trace", "fx_symbolic_trace"])
def test_tracers_of_a_merge_on_eval_module_in_eval_mode(tracer):
    torch.manual_seed(0)
    x = torch.randn(4, 24, 8)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4)], merge_on_eval=True).eval()
    randomize_lora(gm)
    with torch.no_grad():
        expected = gm(x)
        if tracer == "export_strict":
            traced = torch.export.export(gm, (x,), strict=True).module()
        elif tracer == "jit_trace":
            traced = torch.jit.trace(gm, (x,), check_trace=False)
        else:
            traced = torch.fx.symbolic_trace(gm)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)


def test_non_strict_export_of_a_merge_on_eval_module_in_eval_mode():
    torch.manual_seed(0)
    x = torch.randn(4, 24, 8)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4)], merge_on_eval=True).eval()
    randomize_lora(gm)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(gm, (x,), strict=False).module()(x), gm(x), rtol=1e-5, atol=1e-6)


def test_pickle_after_gm_compile():
    """Found by the review, fixed since: pickle after gm.compile(): LoraGraphModule.__reduce__ pickles __dict__ minus _COMPILED, which keeps nn.Module's _compiled_call_impl (torch.compile of the bound _call_impl, not picklable); nn.Module.__getstate__ drops it, so a plain module pickles after .compile() (pre-existing, not f3f0fe6)"""
    torch.manual_seed(0)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4)])  # symbolic: it pickles
    randomize_lora(gm)
    x = torch.randn(4, 24, 8)
    gm.compile(backend="eager")
    with torch.no_grad():
        expected = gm(x)
        torch.testing.assert_close(pickle.loads(pickle.dumps(gm))(x), expected, rtol=0, atol=0)
