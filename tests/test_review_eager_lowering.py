"""Outside review of the eager lowering (``gm.lower_branches = True``, 488c241, b2b44cc, 6573728;
HEAD also has 252bb62's autocast fix).  Since bbbfc96 the lowering is on by default (``"auto"``: CUDA
float16/bfloat16); it merges only where no gradient is recorded; the helpers here compare both settings with
gradients (where the lowered calls run the graph's own operators) and without (where they merge where that
pays).

Contract under review: on CPU, ``lower_branches = True`` gives the same outputs and gradients as
``lower_branches = False`` (float32, to rounding) for every module fxlora can rewrite, and never changes
the module's graph, state dict, fold, saved adapters, or what compilers and tracers see.

The review found nine bugs, each now a test here that passes: hooks and old-style weight_norm on a base
nn.Linear bypassed, a swapped base module or a bias added later not followed (a base that is a module call
is now left a module call), torch.func grad and vmap and forward-mode AD raising on the merged call (it has
setup_context, a generated vmap rule and a jvp now), and a first call under functional_call switching the
lowering off for good (the factor it reads may be a plain tensor).
"""

from __future__ import annotations

import copy
import operator
import pickle

import fxlora
import pytest
import torch
import torch.nn.functional as F
from fxlora import Rule, ops
from torch import nn

from helpers import randomize_lora, tiny_hf_gpt2, TinyTransformer


# --------------------------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------------------------- #


def _run(gm, mode, call, inputs=()):
    """Output, the gradients of every parameter (and of ``inputs``) and the eager counters, with
    ``lower_branches = mode``."""
    gm.lower_branches = mode
    for t in (*gm.parameters(), *inputs):
        t.grad = None
    ops.counters.clear()
    torch.manual_seed(1)  # the same dropout masks both times
    out = call(gm)
    if out.requires_grad:
        out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs) if t.grad is not None})
    return out.detach(), grads, dict(ops.counters)


def _assert_same(gm, call, inputs=(), rtol=1e-4, atol=1e-5, lowers=True):
    """Lowering on against off; returns the counters of the lowered runs.  Where a gradient is recorded (a
    train step, input gradients) the lowered calls run the graph's own operators, never a merge; then, with no gradient recorded, the lowered calls run (merged where that pays)."""
    calls = {}

    def compare(grad):
        out0, grads0, calls0 = _run(gm, False, call, inputs)
        out1, grads1, calls1 = _run(gm, True, call, inputs)
        assert not calls0
        if not grad and any(t.requires_grad for t in inputs):
            # no gradient recorded but an input requires one (a reentrant checkpoint's first forward): the graph
            assert not calls1, calls1
        elif lowers:
            assert calls1.get("linear.merged", 0) + calls1.get("linear.branch", 0) > 0, calls1
        if grad:
            assert "linear.merged" not in calls1, calls1
        # with gradients the operators are the graph's, but autograd may sum a tensor's gradients in another
        # order (a tensor feeding a lowered call and other nodes): equal to rounding
        tol = {"rtol": rtol, "atol": atol}
        torch.testing.assert_close(out1, out0, **tol)
        assert grads1.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads1[name], grads0[name], **tol, msg=name)
        for k, v in calls1.items():
            calls[k] = calls.get(k, 0) + v

    if torch.is_grad_enabled():
        compare(grad=True)
    with torch.no_grad():
        compare(grad=False)
    return calls


class Small(nn.Module):
    """A Linear site, an ``F.linear`` site, an ``x @ W`` site and an embedding-free float input."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=bias)
        self.w1 = nn.Parameter(torch.randn(12, 8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(12, 8) * 0.1)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return F.linear(h, self.w1) + operator.matmul(x, self.w2.t())


def _small(bias: bool = True, **kw):
    torch.manual_seed(0)
    gm = fxlora.rewrite(Small(bias), [Rule("*", r=2, alpha=4)], **kw).train()
    randomize_lora(gm)
    return gm


def _lowered_once(**kw):
    """A small module with lowering on, called once (its lowering built), and its input."""
    gm, x = _small(**kw), _x(6, 20)
    gm.lower_branches = True
    with torch.no_grad():
        gm(x)
    return gm, x


def _x(*lead, seed=0):
    return torch.randn(*lead, 8, generator=torch.Generator().manual_seed(seed))


def _tiny(adapter="default", **kw):
    torch.manual_seed(0)
    rules = [Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]), Rule("re:blocks\\.\\d+\\.proj", r=3, alpha=3),
             Rule(nn.Embedding, r=4, alpha=8), Rule("head", r=2, alpha=2)]
    # captured with torch.export: its linear bases are functional calls, which lower (a module call stays one)
    gm = fxlora.rewrite(TinyTransformer(), rules, adapter=adapter, capture="export", example_inputs=(IDS,), **kw).train()
    randomize_lora(gm)
    return gm


IDS = torch.randint(0, 40, (4, 24), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------- #
# bugs (strict xfails)
# --------------------------------------------------------------------------------------------- #


def test_forward_hook_on_a_base_linear_runs_when_lowered():
    gm = _small()
    gm.fc.register_forward_hook(lambda module, args, out: out * 2)
    _assert_same(gm, lambda g: g(_x(6, 20)))


def test_forward_pre_hook_on_a_base_linear_runs_when_lowered():
    gm = _small()
    gm.fc.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    _assert_same(gm, lambda g: g(_x(6, 20)))


def test_weight_norm_on_a_base_linear_trains_when_lowered():
    gm = _small()
    torch.nn.utils.weight_norm(gm.fc)
    with torch.no_grad():
        gm.fc.weight_g.mul_(3)
    _assert_same(gm, lambda g: g(_x(6, 20)))


def test_a_base_module_swapped_after_a_lowered_call():
    gm, x = _lowered_once()

    class Scaled(nn.Linear):
        def forward(self, inp):
            return super().forward(inp) * 3

    new = Scaled(8, 8)
    new.load_state_dict({"weight": gm.fc.weight.detach(), "bias": gm.fc.bias.detach()})
    new.lora_A, new.lora_B = gm.fc.lora_A, gm.fc.lora_B
    gm.fc = new
    _assert_same(gm, lambda g: g(x))


def test_a_bias_given_after_a_lowered_call():
    gm, x = _lowered_once(bias=False)
    gm.fc.bias = nn.Parameter(torch.ones(8))
    _assert_same(gm, lambda g: g(x))


def test_torch_func_grad_when_lowered():
    from torch.func import functional_call, grad

    gm = _small()
    x = _x(6, 20)
    gm.lower_branches = True
    with torch.no_grad():
        gm(x)  # lowered once outside torch.func (see test_a_first_lowered_call_under_functional_call...)
    params = {n: p.detach() for n, p in gm.named_parameters()}
    results = []
    for mode in (False, True):
        gm.lower_branches = mode
        results.append(grad(lambda p: functional_call(gm, p, (x,)).square().mean())(params))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_torch_func_vmap_when_lowered():
    from torch.func import vmap

    gm, x = _lowered_once()
    outs = []
    for mode in (False, True):
        gm.lower_branches = mode
        outs.append(vmap(gm)(x).detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-6)


def test_a_first_lowered_call_under_functional_call_does_not_switch_lowering_off_for_good():
    from torch.func import functional_call

    gm = _small()
    x = _x(6, 20)
    gm.lower_branches = True
    with torch.no_grad():
        functional_call(gm, {k: v.detach().clone() for k, v in gm.named_parameters()}, (x,))
        ops.counters.clear()
        gm(x)
    assert ops.counters.get("linear.merged", 0) == 2, dict(ops.counters)  # fc is a module call: not lowered


def test_forward_mode_ad_when_lowered():
    import torch.autograd.forward_ad as fwAD

    gm = _small()
    x = _x(6, 20)
    tangents = []
    for mode in (False, True):
        gm.lower_branches = mode
        with fwAD.dual_level():
            out = gm(fwAD.make_dual(x, torch.ones_like(x)))
            tangents.append(fwAD.unpack_dual(out).tangent.detach())
    torch.testing.assert_close(tangents[1], tangents[0], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- #
# what held
# --------------------------------------------------------------------------------------------- #


def test_hf_gpt2_conv1d_masks_dropout_bias_all_and_a_trainable_base_weight():
    model, ids = tiny_hf_gpt2()
    gm = fxlora.rewrite(model, [Rule("transformer.h.*.attn.c_attn", r=4, alpha=8, enable_lora=[True, False, True], dropout=0.1),
                                Rule("transformer.h.*.mlp.c_fc", r=2, alpha=4)],
                        example_inputs=(ids[:, :8],), example_kwargs={"use_cache": False}, bias="all").train()
    randomize_lora(gm)
    gm.get_parameter("transformer.h.0.mlp.c_fc.weight").requires_grad_(True)
    calls = _assert_same(gm, lambda g: g(ids, use_cache=False).logits)
    assert calls.get("linear.merged", 0) + calls.get("linear.branch", 0) > 0  # lowered where no gradient is recorded
    gm.eval()
    _assert_same(gm, lambda g: g(ids, use_cache=False).logits)
    with torch.no_grad():
        calls = _assert_same(gm, lambda g: g(ids, use_cache=False).logits)
    assert calls.get("linear.merged", 0) > 0
    with torch.no_grad():
        _assert_same(gm, lambda g: g(ids[:1, :1], use_cache=False).logits)  # one token: the branch side of merge_pays


@pytest.mark.parametrize("lead", [(6, 20), (), (0,), (0, 5), (1, 1)], ids=str)
def test_input_shapes_and_input_gradients(lead):
    """Many tokens (merged), one token or a 1-D input (the branch), zero-size batches."""
    gm = _small()
    x = _x(*lead, seed=1).requires_grad_()
    _assert_same(gm, lambda g: g(x), inputs=(x,))


def test_non_contiguous_inputs_double_precision_and_all_weights_trainable():
    gm = _small()
    for p in gm.parameters():
        p.requires_grad_(True)
    x = torch.randn(8, 20, 6).transpose(0, 2).requires_grad_()  # (6, 20, 8), not contiguous
    calls = _assert_same(gm, lambda g: g(x), inputs=(x,))
    # the F.linear and x @ W sites, the branch where a gradient is recorded; where none is, x requires one (as
    # in a reentrant checkpoint's first forward), so the graph runs; fc is a module call
    assert calls == {"linear.branch": 2}
    g64 = copy.deepcopy(gm).double()
    x64 = x.detach().double()
    _assert_same(g64, lambda g: g(x64), rtol=1e-10, atol=1e-12)


def test_double_backward_with_lowering_on():
    gm = _small()
    x0 = _x(6, 20)

    def penalty(g):
        x = x0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(g(x).square().sum(), x, create_graph=True)
        return gx.square().sum().reshape(1)

    out0, grads0, calls0 = _run(gm, False, penalty)
    out1, grads1, calls1 = _run(gm, True, penalty)
    assert not calls0 and calls1 == {"linear.branch": 2}  # gradients recorded: the branch's own operators
    torch.testing.assert_close(out1, out0)
    assert grads1.keys() == grads0.keys()
    for k in grads0:  # the same operators; autograd may sum x's gradients in another order
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-5, atol=1e-7, msg=k)
    # the lowered calls' own double backward (what they run if called with gradients recorded)
    x, W, A, B = _x(6, 8).requires_grad_(), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    for t in (W, A, B):
        t.requires_grad_()
    for f in (ops.lora_linear_eager, lambda x, W, b, A, B, s: F.linear(x, W) + F.linear(F.linear(x, A), B) * s):
        (gx,) = torch.autograd.grad(f(x, W, None, A, B, 0.5).square().sum(), x, create_graph=True)
        gg = torch.autograd.grad(gx.square().sum(), (W, A, B))
        if f is ops.lora_linear_eager:
            got = gg
        else:
            for g, e in zip(got, gg):
                torch.testing.assert_close(g, e)


def test_autocast_no_grad_inference_mode_and_dropout():
    gm = _tiny()
    for m in (getattr(gm.blocks, "0").qkv, getattr(gm.blocks, "1").qkv):
        assert isinstance(m, nn.Module)
    _assert_same(gm, lambda g: g(IDS))

    def autocast(g):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return g(IDS).float()

    _assert_same(gm, autocast, rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        _assert_same(gm, lambda g: g(IDS))
    with torch.inference_mode():
        _assert_same(gm, lambda g: g(IDS))


def test_chained_adapters_and_adapter_operations_after_a_lowered_call():
    gm = _tiny("a")
    fxlora.add_adapter(gm, [Rule("blocks.*.qkv", r=2, alpha=3, dropout=0.2, enable_lora=[True, False, True]),
                             Rule("blocks.*.proj", r=3, alpha=2)], "b")
    randomize_lora(gm, seed=5)
    gm.lower_branches = True
    with torch.no_grad():
        gm(IDS)
    for step in (lambda: fxlora.set_adapter(gm, ["a", "b"]), lambda: fxlora.set_adapter(gm, "b"),
                 lambda: fxlora.combine_adapters(gm, {"a": 0.5, "b": 0.7}, "c") or fxlora.set_adapter(gm, "c"),
                 lambda: fxlora.delete_adapter(gm, "b")):
        step()
        gm.train()
        _assert_same(gm, lambda g: g(IDS))
        gm.lower_branches = True
        with torch.no_grad():
            gm(IDS)


def test_loading_casting_and_replacing_parameters_after_a_lowered_call(tmp_path):
    gm, src = _tiny(), _tiny()
    randomize_lora(src, seed=9)
    path = fxlora.save_lora(src, tmp_path / "a.safetensors")
    gm.lower_branches = True
    with torch.no_grad():
        gm(IDS)
    fxlora.load_lora(gm, path)
    _assert_same(gm, lambda g: g(IDS))
    with torch.no_grad():
        torch.testing.assert_close(gm(IDS), src(IDS), rtol=1e-5, atol=1e-6)
    gm.head.weight = nn.Parameter(torch.randn_like(gm.head.weight))
    gm.head.lora_A = nn.Parameter(torch.randn_like(gm.head.lora_A) * 0.1)
    _assert_same(gm, lambda g: g(IDS))
    gm.double()
    _assert_same(gm, lambda g: g(IDS), rtol=1e-10, atol=1e-12)
    gm.half()
    with torch.no_grad():
        _assert_same(gm, lambda g: g(IDS).float(), rtol=1e-2, atol=1e-2)


def _saved(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if "time" not in k and "date" not in k}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def test_graph_state_dict_fold_saved_adapters_and_copies_unchanged(tmp_path):
    gm = _tiny()
    code, nodes = gm.code, [(n.op, n.target, n.name) for n in gm.graph.nodes]
    state = {k: (v.clone(), id(v)) for k, v in gm.state_dict(keep_vars=True).items()}
    gm.eval()
    with torch.no_grad():
        folded_before = fxlora.fold(gm)(IDS)
    saved_before = _saved(fxlora.save_lora(gm, tmp_path / "before.safetensors"))
    gm.train()
    _assert_same(gm, lambda g: g(IDS))
    gm.lower_branches = True
    with torch.no_grad():
        gm(IDS)
    assert gm.code == code and [(n.op, n.target, n.name) for n in gm.graph.nodes] == nodes
    after = gm.state_dict(keep_vars=True)
    assert after.keys() == state.keys()
    for k, (v, ident) in state.items():
        assert id(after[k]) == ident and torch.equal(after[k].detach(), v.detach()), k
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(fxlora.fold(gm)(IDS), folded_before, rtol=0, atol=0)
    saved_after = _saved(fxlora.save_lora(gm, tmp_path / "after.safetensors"))
    assert saved_after[1] == saved_before[1] and saved_after[0].keys() == saved_before[0].keys()
    assert all(torch.equal(saved_after[0][k], saved_before[0][k]) for k in saved_before[0])
    gm.train()
    with torch.no_grad():
        expected = gm(IDS)
        for other in (copy.deepcopy(gm),):  # a torch.export capture cannot be pickled (its input guards)
            torch.testing.assert_close(other(IDS), expected, rtol=1e-5, atol=1e-6)
    small = _small()
    small.lower_branches = True
    x = _x(6, 20)
    with torch.no_grad():
        expected = small(x)
        for other in (copy.deepcopy(small), pickle.loads(pickle.dumps(small))):
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_on_eval_wins_in_eval_mode():
    gm = _tiny(merge_on_eval=True).eval()
    _assert_same(gm, lambda g: g(IDS), lowers=False)
    gm.train()
    _assert_same(gm, lambda g: g(IDS))


def test_ddp_on_cpu_with_one_gloo_process():
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available():
        pytest.skip("no torch.distributed")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        gm = _tiny()
        ddp = DistributedDataParallel(gm)
        _assert_same(gm, lambda g: ddp(IDS))
    finally:
        dist.destroy_process_group()
