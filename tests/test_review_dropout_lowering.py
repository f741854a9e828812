"""Review of 987d9bc + 5d6141b: the no-grad eager lowering of sites with LoRA dropout.

Every test compares ``lower_branches=True`` with ``lower_branches=False`` (the module's own graph) on the
same module, with the same seed before each call: in eval mode to float32 rounding (the merge rounds once
more), in train mode without gradients bit for bit where every lowered site has LoRA dropout (the same
masks), and to rounding where a site without dropout merges.  The bugs it found are fixed; their tests are at the end, each docstring saying what was wrong.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import CompiledGraphs, Functional, randomize_lora, tiny_hf_gpt2, TinyTransformer
from torch import nn

import fxlora
from fxlora import Rule, ops, zoo

IDS = torch.randint(0, 40, (4, 24), generator=torch.Generator().manual_seed(0))
TOL = dict(rtol=1e-5, atol=1e-6)


def _tiny(rules, **kw):
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), rules, capture="export", example_inputs=(IDS,), **kw)
    randomize_lora(gm)
    return gm


def _dropout_tiny(**kw):
    return _tiny([Rule("blocks.*.qkv", r=2, alpha=4, dropout=0.1), Rule("head", r=2, alpha=2, dropout=0.2)], **kw)


def _pair(gm, call, training, seed=1):
    """(graph output, lowered output, counters of the lowered call), without gradients."""
    if training is not None:  # None: the modes as they are
        gm.train(training)
    with torch.no_grad():
        gm.lower_branches = False
        torch.manual_seed(seed)
        expected = call(gm)
        gm.lower_branches = True
        ops.counters.clear()
        torch.manual_seed(seed)
        out = call(gm)
    return expected, out, dict(ops.counters)


def _check(gm, call, *, exact_train=True, merged_eval=None, branch_train=None):
    """Both modes; returns the counters per mode.  ``exact_train``: train mode is bit-equal."""
    calls = {}
    for training in (False, True):
        expected, out, c = _pair(gm, call, training)
        calls[training] = c
        torch.testing.assert_close(out, expected, **TOL, msg=f"training={training}")
        if training and exact_train:
            assert torch.equal(out, expected), "train mode without gradients: not the graph's masks"
    if merged_eval is not None:
        assert calls[False].get("linear.merged", 0) == merged_eval, calls
    if branch_train is not None:
        assert calls[True].get("linear.branch", 0) == branch_train, calls
    return calls


# --------------------------------------------------------------------------------------------- #
# what held
# --------------------------------------------------------------------------------------------- #


def test_several_adapters_some_with_dropout():
    gm = _tiny([Rule("blocks.*.qkv", r=2, alpha=4, dropout=0.1), Rule("head", r=2, alpha=2)])
    fxlora.add_adapter(gm, [Rule("blocks.*.qkv", r=2, alpha=4, dropout=0.3), Rule("head", r=3, alpha=2, dropout=0.3),
                            Rule("blocks.*.proj", r=2, alpha=2, dropout=0.5)], "b")
    randomize_lora(gm, seed=1)
    call = lambda g: g(IDS)  # noqa: E731
    # default: qkv (dropout) and head (none) lower; in train mode head merges, qkv runs the branch
    c = _check(gm, call, exact_train=False, merged_eval=3)
    assert c[True] == {"linear.branch": 2, "linear.merged": 1}
    fxlora.set_adapter(gm, "b")  # every b site has dropout: bit-equal in train mode
    _check(gm, call, merged_eval=5, branch_train=5)
    fxlora.set_adapter(gm, ["default", "b"])  # chained sites: the first adapter's call lowers, the second stays
    _check(gm, call, exact_train=False)
    fxlora.combine_adapters(gm, {"default": 1.0, "b": 0.5}, "c", method="cat")
    fxlora.set_adapter(gm, "c")  # each combined site takes its first adapter's dropout: head (default's) has none
    c = _check(gm, call, exact_train=False, merged_eval=5)
    assert c[True] == {"linear.branch": 4, "linear.merged": 1}
    fxlora.delete_adapter(gm, "b")
    fxlora.set_adapter(gm, ["c", "default"])
    _check(gm, call, exact_train=False)
    with fxlora.disable_adapter(gm):
        assert _check(gm, call) == {False: {}, True: {}}


def test_zoo_gpt2_conv1d_fan_in_fan_out_and_enable_lora_symbolic_and_export():
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    for capture in (None, "export"):
        torch.manual_seed(0)
        kw = {"capture": capture, "example_inputs": (ids,)} if capture else {}
        model = zoo.GPT2(zoo.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, dropout=0.1))
        gm = fxlora.rewrite(model, [Rule("*.c_attn", r=4, alpha=8, dropout=0.1, fan_in_fan_out=True, enable_lora=[True, False, True]),
                                    Rule("*.c_fc", r=4, alpha=8, dropout=0.2, fan_in_fan_out=True)], **kw)
        randomize_lora(gm)
        # the model's own dropouts draw too (train mode): every lowered site runs over its own mask
        _check(gm, lambda g: g(ids), merged_eval=4, branch_train=4)


def test_hf_gpt2_export_dropout_on_every_site_with_the_models_own_dropout():
    model, ids = tiny_hf_gpt2()
    gm = fxlora.rewrite(model, [Rule("transformer.h.*.attn.c_attn", r=4, alpha=8, enable_lora=[True, False, True], dropout=0.1),
                                Rule("transformer.h.*.mlp.c_*", r=2, alpha=4, dropout=0.3)],
                        example_inputs=(ids[:, :8],), example_kwargs={"use_cache": False})
    randomize_lora(gm)
    _check(gm, lambda g: g(ids, use_cache=False).logits, merged_eval=6, branch_train=6)


def test_functional_capture_symbolic_and_export_p_edge_values():
    x = torch.randn(4, 24, 8, generator=torch.Generator().manual_seed(2))
    for capture in (None, "export"):
        torch.manual_seed(0)
        kw = {"capture": capture, "example_inputs": (x,)} if capture else {}
        gm = fxlora.rewrite(Functional(), [Rule("proj", r=2, alpha=4, dropout=0.25), Rule("w1", r=2, alpha=4, dropout=0.95),
                                           Rule("w2", r=2, alpha=4, dropout=0.0), Rule("fc", r=2, alpha=4, dropout=0.5)], **kw)
        randomize_lora(gm)
        assert not hasattr(gm, "w2_lora_dropout")  # dropout=0.0: no dropout module, merges in train mode too
        c = _check(gm, lambda g: g(x), exact_train=False)
        assert c[True].get("linear.merged", 0) == 1 and c[True].get("linear.branch", 0) == (2 if capture is None else 4)
        assert c[False] == {"linear.merged": 3 if capture is None else 5}


class QKV(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


def test_symbolic_linear_bases_stay_module_calls_and_fuse_siblings_with_dropout():
    x = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(3))
    rules = [Rule("q", r=2, alpha=4, dropout=0.1), Rule("k", r=2, alpha=4, dropout=0.1), Rule("v", r=2, alpha=4), Rule("o", r=2, alpha=2, dropout=0.2)]
    torch.manual_seed(0)
    gm = fxlora.rewrite(QKV(), rules, fuse_siblings=True)
    randomize_lora(gm)
    assert _check(gm, lambda g: g(x)) == {False: {}, True: {}}  # nn.Linear module calls: nothing lowers
    for r in (rules, [Rule("*", r=2, alpha=4, dropout=0.1)]):
        torch.manual_seed(0)
        gm = fxlora.rewrite(QKV(), r, fuse_siblings=True, capture="export", example_inputs=(x,))
        randomize_lora(gm)
        _check(gm, lambda g: g(x), exact_train=r is not rules, merged_eval=4)


def test_a_dropout_toggled_swapped_or_with_p_changed():
    gm = _dropout_tiny()
    call = lambda g: g(IDS)  # noqa: E731
    drop = gm.get_submodule("head.lora_dropout")
    gm.eval()
    drop.train()  # gm in eval mode, this one draws: its site runs the branch over its output
    expected, out, c = _pair(gm, call, training=None)
    assert c == {"linear.merged": 2, "linear.branch": 1}
    assert torch.equal(_pair(gm, call, training=None, seed=5)[1], _pair(gm, call, training=None, seed=5)[1])
    torch.testing.assert_close(out, expected, **TOL)
    assert not torch.allclose(out, _pair(gm, call, training=None, seed=2)[1])  # the dropout did draw
    gm.train()
    drop.eval()  # gm in train mode, this one the identity: it merges
    expected, out, c = _pair(gm, call, training=None)
    torch.testing.assert_close(out, expected, **TOL)
    assert c == {"linear.merged": 1, "linear.branch": 2}
    for p in (0.9, 1.0):
        drop.p = p
        _check(gm, call, merged_eval=3, branch_train=3)
    # a dropout that gives back its input merges, whatever it is: p = 0 in train mode (F.dropout returns x), or
    # an nn.Identity swapped in since the lowering (in train mode the merge rounds otherwise: not bit-equal)
    for change in ("p=0", "identity"):
        if change == "p=0":
            drop.p = 0.0
        else:
            gm.get_submodule("head").lora_dropout = nn.Identity()
        c = _check(gm, call, exact_train=False, merged_eval=3, branch_train=2)
        assert c[True] == {"linear.merged": 1, "linear.branch": 2}, change
    gm.get_submodule("head").lora_dropout = nn.Dropout(0.5)  # a fresh nn.Dropout: draws in train mode again
    _check(gm, call, merged_eval=3, branch_train=3)


def _graph_and_compiled(gm, compiled):
    """No gradients, the same seed: ``gm``'s graph (lowering off), then the compiled module (lowering on)."""
    with torch.no_grad():
        gm.lower_branches = False
        torch.manual_seed(1)
        expected = gm(IDS)
        gm.lower_branches = True
        torch.manual_seed(1)
        return expected, compiled(IDS)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_fullgraph_switching_train_and_eval(backend):
    gm = _dropout_tiny()
    gm.lower_branches = True
    counting = CompiledGraphs()
    compiled = torch.compile(gm, backend=counting if backend == "eager" else backend, fullgraph=True)
    for training in (False, True, False, True):
        gm.train(training)
        expected, out = _graph_and_compiled(gm, compiled)
        torch.testing.assert_close(out, expected, **TOL)
        if training:
            assert torch.equal(out, expected)
    if backend == "eager":
        assert len(counting.graphs) == 2 and counting.count("addmm") == 3  # eval: three merges; train: none
    # a dropout switched alone, between compiled calls
    gm.eval()
    gm.get_submodule("head.lora_dropout").train()
    expected, out = _graph_and_compiled(gm, compiled)
    torch.testing.assert_close(out, expected, **TOL)


def test_compiled_with_a_dropout_hooked_and_one_swapped_before_compiling():
    gm = _dropout_tiny().eval()
    gm.get_submodule("head.lora_dropout").register_forward_hook(lambda m, a, out: out * 0)
    gm.get_submodule("blocks.0.qkv").lora_dropout = nn.Sequential(nn.Dropout(0.1), nn.Tanh()).eval()
    counting = CompiledGraphs()
    compiled = torch.compile(gm, backend=counting, fullgraph=True)
    for training in (False, True):
        gm.train(training)
        expected, out = _graph_and_compiled(gm, compiled)
        torch.testing.assert_close(out, expected, **TOL)
    assert counting.count("addmm") == 1  # only blocks.1.qkv merges


def test_functional_call_inference_mode_and_autocast():
    gm = _dropout_tiny()
    scaled = {n: p * 1.5 for n, p in gm.named_parameters() if "lora_" in n}
    _check(gm, lambda g: torch.func.functional_call(g, scaled, (IDS,)), merged_eval=3, branch_train=3)

    def inference(g):
        with torch.inference_mode():
            return g(IDS).clone()

    _check(gm, inference, merged_eval=3, branch_train=3)

    def autocast(g):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return g(IDS).float()

    c = _check(gm, autocast)  # autocast: the graph's ops, never a merge
    assert "linear.merged" not in c[False] and "linear.merged" not in c[True]


def test_merge_on_eval_and_served_modules():
    gm = _dropout_tiny(merge_on_eval=True)
    c = _check(gm, lambda g: g(IDS), branch_train=3)
    assert c[False] == {}  # eval: the folded module
    gm = _dropout_tiny()
    fxlora.add_adapter(gm, [Rule("blocks.*.qkv", r=2, alpha=4, dropout=0.3), Rule("head", r=2, alpha=2)], "b")
    randomize_lora(gm, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = fxlora.serve(gm)
    _check(served, lambda g: g(IDS, adapter_ids=torch.tensor([0, 1, 1, 0])))


def test_copies_after_a_lowered_call():
    x = torch.randn(4, 24, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    gm = fxlora.rewrite(Functional(), [Rule("*", r=2, alpha=4, dropout=0.25)])
    randomize_lora(gm)
    for training in (False, True):
        _pair(gm, lambda g: g(x), training)  # both lowered forwards built
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert copied.lower_branches is True
        _check(copied, lambda g: g(x), merged_eval=3, branch_train=3)
        copied.get_submodule("proj").lora_dropout = nn.Identity()  # the copy's own modules
    _check(gm, lambda g: g(x), merged_eval=3, branch_train=3)
    gm2 = _dropout_tiny()
    _pair(gm2, lambda g: g(IDS), False)
    _check(copy.deepcopy(gm2), lambda g: g(IDS), merged_eval=3, branch_train=3)


def test_fold_save_lora_graph_and_state_dict_unaffected(tmp_path):
    gm = _dropout_tiny()
    code, keys = gm.code, list(gm.state_dict())
    before = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
    for training in (False, True):
        _pair(gm, lambda g: g(IDS), training)
    assert gm.code == code and list(gm.state_dict()) == keys
    after = fxlora.lora_state_dict(gm)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fxlora.save_lora(gm, tmp_path / "a.safetensors")
    assert (tmp_path / "a.safetensors").stat().st_size > 0
    gm.eval()
    with torch.no_grad():
        gm.lower_branches = False
        expected = gm(IDS)
        folded = fxlora.fold(gm)(IDS)
    torch.testing.assert_close(folded, expected, **TOL)


def test_a_train_step_after_no_grad_calls_has_the_graphs_gradients():
    gm = _dropout_tiny().train()
    results = {}
    for mode in (False, True):
        gm.lower_branches = mode
        for p in gm.parameters():
            p.grad = None
        with torch.no_grad():
            torch.manual_seed(3)
            gm(IDS)  # the no-grad lowered forward built first
        ops.counters.clear()
        torch.manual_seed(1)
        out = gm(IDS)
        out.square().mean().backward()
        results[mode] = out.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}, dict(ops.counters)
    (out0, g0, _), (out1, g1, calls) = results[False], results[True]
    assert calls == {}  # every site has dropout: none lowers where gradients are recorded
    assert torch.equal(out0, out1) and g0.keys() == g1.keys() and len(g0) == 6
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


# --------------------------------------------------------------------------------------------- #
# what the review found, fixed since
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
def test_fixed_global_module_hooks_on_the_dropout_are_ignored_in_eval(kind):
    """Found by the review, fixed since: a global module hook (torch.nn.modules.module.register_module_forward_hook / _pre_hook) on an eval-mode LoRA nn.Dropout changes the graph's branch input, but lora_linear_dropout_eager (and _dropout_of) check only the module's own _forward_hooks/_forward_pre_hooks, so the lowered site merges over x and ignores it"""
    gm = _dropout_tiny().eval()

    def hook(module, args, out=None):
        if type(module) is nn.Dropout:
            return out * 0 if kind == "forward_hook" else (args[0] * 0,)
        return None

    register = getattr(torch.nn.modules.module, f"register_module_{kind}")
    handle = register(hook)
    try:
        expected, out, _ = _pair(gm, lambda g: g(IDS), training=False)
    finally:
        handle.remove()
    torch.testing.assert_close(out, expected, **TOL)


def test_fixed_an_instance_forward_override_is_ignored_in_eval():
    """Found by the review, fixed since: an nn.Dropout whose forward is overridden on the instance (drop.forward = ...) passes the 'unhooked nn.Dropout in eval mode' test (type and hook dicts only), so the lowered site merges over x while the graph uses the overridden forward's output"""
    gm = _dropout_tiny().eval()
    gm.get_submodule("head.lora_dropout").forward = lambda x: x * 0
    expected, out, _ = _pair(gm, lambda g: g(IDS), training=False)
    torch.testing.assert_close(out, expected, **TOL)


def test_fixed_an_inplace_dropout_in_train_mode_without_gradients():
    """Found by the review, fixed since: an in-place LoRA dropout (nn.Dropout.inplace = True) in train mode without gradients: the graph runs the base GEMM before the dropout overwrites x, the lowered call (inserted at the add, after the dropout node) runs F.linear(x, W) over the dropped x"""
    gm = _dropout_tiny()
    for name in ("blocks.0.qkv.lora_dropout", "blocks.1.qkv.lora_dropout", "head.lora_dropout"):
        gm.get_submodule(name).inplace = True
    expected, out, _ = _pair(gm, lambda g: g(IDS), training=True)  # in-place at lowering: not lowered
    torch.testing.assert_close(out, expected, **TOL)
    # made in-place after the lowering: the lowered call cannot read the x the dropout overwrote, and says so
    fresh = _dropout_tiny().train()
    fresh.lower_branches = True
    with torch.no_grad():
        fresh(IDS)
        fresh.get_submodule("head.lora_dropout").inplace = True
        with pytest.raises(fxlora.errors.LoraOpError, match="in-place after the module was lowered"):
            fresh(IDS)
