"""merge_on_eval: eval runs the folded model, train returns to the branches, no weight ever drifts."""

from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys

import fxlora
import loralib
import pytest
import torch
from torch import nn

from helpers import TinyTransformer, randomize_lora

RULES = [fxlora.Rule("blocks.*.qkv", r=4, alpha=8, enable_lora=[True, False, True]), fxlora.Rule("head", r=2, alpha=4)]


def _gm(merge_on_eval=True):
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), RULES, merge_on_eval=merge_on_eval)
    randomize_lora(gm)
    return gm


def test_eval_output_equals_fold_and_runs_the_folded_graph():
    gm = _gm()
    x = torch.randint(0, 40, (2, 6))
    gm.eval()
    expected = fxlora.fold(gm)(x)
    assert torch.equal(gm(x), expected)
    merged = gm.merged_module()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert len(merged.graph.nodes) == len(torch.fx.symbolic_trace(TinyTransformer()).graph.nodes)
    gm.train()
    torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=1e-5)
    assert gm.__dict__["_fxlora_cache"] is None  # the merged copy is freed on train()


def test_off_keeps_the_branches_in_eval():
    gm = _gm(merge_on_eval=False)
    gm.eval()
    x = torch.randint(0, 40, (2, 6))
    gm(x)
    assert gm.__dict__["_fxlora_cache"] is None


def test_1000_toggles_leave_every_weight_bit_identical():
    # a model small enough that 1000 refolds are cheap; the drift loralib shows needs no more (see below)
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    gm = fxlora.rewrite(tiny, [fxlora.Rule("0", r=2, alpha=4), fxlora.Rule("2", r=2, alpha=3)], merge_on_eval=True)
    randomize_lora(gm)
    x = torch.randn(3, 8)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    for _ in range(1000):
        gm.eval()
        gm(x)
        gm.train()
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loralib_drifts_where_fxlora_does_not():
    """The baseline this feature fixes: loralib's merge/unmerge changes weight.data."""
    torch.manual_seed(0)
    layer = loralib.Linear(256, 256, r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = layer.weight.detach().clone()
    layer.eval()
    layer.train()
    changed = (layer.weight != w0).float().mean().item()
    assert changed > 0.0  # loralib: a fraction of elements off by an ulp after one toggle


def test_cache_follows_changes_to_lora_tensors():
    gm = _gm()
    x = torch.randint(0, 40, (2, 6))
    gm.eval()
    first = gm(x)
    with torch.no_grad():
        gm.get_parameter("head.lora_B").mul_(3.0)  # an in-place change while in eval mode
    second = gm(x)
    assert not torch.allclose(first, second)
    assert torch.equal(second, fxlora.fold(gm)(x))
    fxlora.load_lora_state_dict(gm, {k: torch.zeros_like(v) for k, v in fxlora.lora_state_dict(gm).items()})
    torch.testing.assert_close(gm(x), fxlora.fold(gm)(x))


def test_a_training_step_after_eval_still_trains():
    gm = _gm()
    x = torch.randint(0, 40, (4, 6))
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    gm.eval()
    with torch.no_grad():
        gm(x)
    gm.train()
    before = gm.get_parameter("head.lora_B").detach().clone()
    loss = nn.functional.cross_entropy(gm(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert gm.get_parameter("head.lora_B").grad is not None
    opt.step()
    assert not torch.equal(before, gm.get_parameter("head.lora_B"))
    gm.eval()
    assert torch.equal(gm(x), fxlora.fold(gm)(x))  # the refreshed cache sees the step


def test_deepcopy_keeps_merge_on_eval():
    gm = _gm()
    clone = copy.deepcopy(gm)
    assert isinstance(clone, fxlora.LoraGraphModule) and clone.merge_on_eval
    x = torch.randint(0, 40, (2, 6))
    clone.eval()
    gm.eval()
    assert torch.equal(clone(x), gm(x))


# -- in-place changes that do not bump a version counter are noticed ---------------------------------


class _Normed(nn.Module):
    """A linear site, a shared (non-adapted) linear and a batch norm whose buffers the fold copies."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.other(self.bn(self.fc(x)))


def _normed_gm():
    torch.manual_seed(0)
    model = _Normed()
    gm = fxlora.rewrite(model, [fxlora.Rule("fc", r=2, alpha=4)], merge_on_eval=True)
    randomize_lora(gm)
    with torch.no_grad():
        gm(torch.randn(16, 8))  # training-mode forward: batch norm statistics that are not the defaults
    return model, gm


def _numpy_write(t):
    t.detach().numpy()[...] = 0.25  # shares memory, bumps no counter


@pytest.mark.parametrize("name", ["fc.lora_B", "fc.lora_A", "fc.weight", "other.weight", "bn.running_mean"])
@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.data.zero_(),
        lambda t: t.data.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(3))),
        _numpy_write,
        lambda t: t.data.neg_(),
    ],
    ids=["data.zero_", "data.copy_", "numpy", "data.neg_"],
)
def test_changes_through_data_never_serve_a_stale_fold(name, change):
    _, gm = _normed_gm()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    gm.eval()
    first = gm(x)
    tensor = gm.get_parameter(name) if "running" not in name else gm.get_buffer(name)
    version = tensor._version
    change(tensor)
    assert tensor._version == version  # the change is invisible to version counters
    second = gm(x)
    assert not torch.equal(first, second)
    assert torch.equal(second, fxlora.fold(gm).eval()(x))  # exactly what a fresh fold gives


def test_a_change_to_the_callers_model_through_data_is_noticed():
    model, gm = _normed_gm()
    x = torch.randn(4, 8)
    gm.eval()
    first = gm(x)
    model.fc.weight.data.mul_(2)  # rewrite shares the base weights' storage with the model
    assert not torch.equal(first, gm(x)) and torch.equal(gm(x), fxlora.fold(gm).eval()(x))


def test_an_unchanged_module_reuses_its_fold():
    _, gm = _normed_gm()
    gm.eval()
    x = torch.randn(4, 8)
    gm(x)
    merged = gm.merged_module()
    gm(x)
    assert gm.merged_module() is merged


def test_a_refresh_after_a_step_compares_the_unchanged_weights_instead_of_copying_them():
    _, gm = _normed_gm()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    gm.eval()
    first = gm(x)
    before = dict(gm.__dict__["_fxlora_cache"].snapshots)
    weight, factor = gm.get_parameter("fc.weight"), gm.get_parameter("fc.lora_B")
    with torch.no_grad():
        factor.add_(0.1)  # what an optimizer step changes
    second = gm(x)
    assert not torch.equal(first, second) and torch.equal(second, fxlora.fold(gm).eval()(x))
    after = gm.__dict__["_fxlora_cache"].snapshots
    assert after["fc.weight"] is before["fc.weight"]  # the adapted weight's snapshot still holds its bits: kept
    assert after["fc.lora_B"] is not before["fc.lora_B"] and torch.equal(after["fc.lora_B"], factor)
    weight.data.neg_()  # and a change no version counter sees is still noticed
    third = gm(x)
    assert not torch.equal(second, third) and torch.equal(third, fxlora.fold(gm).eval()(x))


# -- pickling, torch.save, deepcopy ---------------------------------------------------------------


def _same_module(a, b, x):
    assert isinstance(b, fxlora.LoraGraphModule) and b.merge_on_eval == a.merge_on_eval
    assert [(n.op, n.name, n.target) for n in a.graph.nodes] == [(n.op, n.name, n.target) for n in b.graph.nodes]
    assert [n.meta.get("fxlora") for n in a.graph.nodes] == [n.meta.get("fxlora") for n in b.graph.nodes]
    assert fxlora.graph_sites(a) == fxlora.graph_sites(b)
    a.train(), b.train()
    assert torch.equal(a(x), b(x))
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))  # merge_on_eval: the folded module
    assert torch.equal(fxlora.fold(a)(x), fxlora.fold(b)(x))
    sa, sb = fxlora.lora_state_dict(a), fxlora.lora_state_dict(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {n for n, p in a.named_parameters() if p.requires_grad} == {n for n, p in b.named_parameters() if p.requires_grad}


def _torch_round_trip(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


ROUND_TRIPS = {
    "torch.save": _torch_round_trip,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_a_rewritten_module_round_trips(how):
    gm = _gm()
    x = torch.randint(0, 40, (2, 6))
    gm.eval()
    gm(x)  # a cached fold is not part of the copy
    back = ROUND_TRIPS[how](gm)
    _same_module(gm, back, x)
    back.train()
    loss = back(x).logsumexp(-1).mean()
    loss.backward()
    assert back.get_parameter("head.lora_B").grad is not None and back.get_parameter("head.weight").grad is None


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_functional_sites_leaf_modules_and_fused_siblings_round_trip(how):
    from helpers import Conv1D, Functional

    torch.manual_seed(0)
    rules = [fxlora.Rule("proj", r=2, alpha=2, fan_in_fan_out=True), fxlora.Rule("re:fc|w1|w2", r=2, alpha=2)]
    gm = fxlora.rewrite(Functional(), rules, leaf_modules=[Conv1D], merge_on_eval=True)
    randomize_lora(gm)
    _same_module(gm, ROUND_TRIPS[how](gm), torch.randn(3, 8))
    fused = fxlora.rewrite(TinyTransformer(), RULES, fuse_siblings=True)
    randomize_lora(fused)
    _same_module(fused, ROUND_TRIPS[how](fused), torch.randint(0, 40, (2, 6)))


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
def test_a_folded_module_round_trips(how):
    gm = _gm()
    folded = fxlora.fold(gm)
    x = torch.randint(0, 40, (2, 6))
    assert torch.equal(ROUND_TRIPS[how](folded)(x), folded(x))


def test_torch_load_in_a_fresh_process(tmp_path):
    gm = _gm()
    x = torch.randint(0, 40, (2, 6))
    torch.save(gm, tmp_path / "gm.pt")
    torch.save(fxlora.fold(gm), tmp_path / "folded.pt")
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, fxlora\n"
        "gm = torch.load(sys.argv[1] + '/gm.pt', weights_only=False)\n"
        "folded = torch.load(sys.argv[1] + '/folded.pt', weights_only=False)\n"
        "x = torch.load(sys.argv[1] + '/x.pt')\n"
        "torch.save((gm.train()(x), fxlora.fold(gm)(x), folded(x)), sys.argv[1] + '/out.pt')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))  # the model's classes must be importable
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    unmerged, refolded, folded = torch.load(tmp_path / "out.pt")
    gm.train()
    assert torch.equal(unmerged, gm(x)) and torch.equal(refolded, fxlora.fold(gm)(x)) and torch.equal(folded, refolded)


def test_a_module_captured_with_torch_export_says_why_it_cannot_be_pickled():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), RULES, example_inputs=(torch.randint(0, 40, (2, 6)),), capture="export")
    with pytest.raises(fxlora.CheckpointError, match="'_guards_fn'.*fxlora.save_lora"):
        pickle.dumps(gm)
    with pytest.raises(fxlora.CheckpointError, match="cannot be pickled"):
        torch.save(gm, io.BytesIO())
    assert isinstance(copy.deepcopy(gm), fxlora.LoraGraphModule)  # deepcopy does not pickle


def test_every_export_captured_module_refuses_pickling_with_checkpoint_error():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer(), RULES, example_inputs=(torch.randint(0, 40, (2, 6)),), capture="export")
    randomize_lora(gm)
    fxlora.add_adapter(gm, RULES, "b")
    x = torch.randint(0, 40, (2, 6))
    modules = {"rewritten": gm, "folded": fxlora.fold(gm), "served": fxlora.serve(gm)}
    for name, module in modules.items():
        for how in ("pickle", "torch.save"):
            with pytest.raises(fxlora.CheckpointError, match="cannot be pickled.*'_guards_fn'.*to_exported_program"):
                ROUND_TRIPS[how](module)
        copied = copy.deepcopy(module)  # deepcopy does not pickle
        if name != "served":
            assert torch.equal(copied(x), module(x)), name


def test_a_local_hook_is_refused_by_name_not_with_attribute_error():
    gm = _gm()

    def hook(module, args):  # defined in a function: pickle cannot save it
        return None

    gm.get_submodule("head").register_forward_pre_hook(hook)
    with pytest.raises(fxlora.CheckpointError, match="'head'.*_forward_pre_hooks.*hook"):
        pickle.dumps(gm)


def test_merge_on_eval_works_on_a_model_built_under_inference_mode():
    torch.manual_seed(0)
    with torch.inference_mode():
        gm = fxlora.rewrite(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), [fxlora.Rule("*", r=2, alpha=2)],
                            merge_on_eval=True)
        for name, p in gm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x = torch.randn(3, 8)

    def branches():
        gm.train()
        with torch.no_grad():
            out = gm(x)
        gm.eval()
        return out

    expected = branches()
    assert torch.allclose(gm(x), expected, atol=1e-5)
    assert len(list(gm.merged_module().graph.nodes)) < len(list(gm.graph.nodes))  # the fold runs
    with torch.inference_mode():
        gm.get_parameter("0.lora_B").zero_()  # in place, no train() in between: noticed by the bit check
        assert torch.allclose(gm(x), branches(), atol=1e-5)
        gm.get_parameter("2.weight").add_(1.0)
        assert torch.allclose(gm(x), branches(), atol=1e-5)
    assert not torch.allclose(gm(x), expected, atol=1e-3)


def test_a_model_class_defined_in_a_function_still_round_trips():
    class Local(nn.Module):  # its type cannot be pickled; fxlora's record of it is left out
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).relu()

    torch.manual_seed(0)
    gm = fxlora.rewrite(Local(), [fxlora.Rule("fc", r=2, alpha=2)])
    randomize_lora(gm)
    back = pickle.loads(pickle.dumps(gm))
    x = torch.randn(3, 4)
    assert torch.equal(back(x), gm(x)) and torch.equal(fxlora.fold(back)(x), fxlora.fold(gm)(x))


def test_copy_copy_keeps_the_class_and_merge_on_eval():
    gm = _gm()
    clone = copy.copy(gm)
    assert isinstance(clone, fxlora.LoraGraphModule) and clone.merge_on_eval
    assert clone.get_parameter("head.lora_A") is gm.get_parameter("head.lora_A")  # a shallow copy shares


def test_a_first_eval_call_under_inference_mode_leaves_a_fold_that_gradients_can_use():
    torch.manual_seed(0)
    gm = fxlora.rewrite(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), [fxlora.Rule("*", r=2, alpha=2)],
                        merge_on_eval=True).eval()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        first = gm(x)
    y = x.clone().requires_grad_()
    out = gm(y)  # the fold built under inference mode above is reused here, with gradients on
    out.sum().backward()
    assert torch.allclose(out.detach(), first) and y.grad is not None and torch.isfinite(y.grad).all()


def test_merge_on_eval_follows_set_adapter_in_eval_mode():
    torch.manual_seed(0)
    gm = fxlora.rewrite(TinyTransformer().eval(), [fxlora.Rule("blocks.*.qkv", r=2, alpha=4)], adapter="a",
                        merge_on_eval=True)
    fxlora.add_adapter(gm, [fxlora.Rule("head", r=3, alpha=3)], "b")
    randomize_lora(gm, std=0.3)
    x = torch.randint(0, 40, (2, 6))
    expected = {}
    for name in ("a", "b", None):  # each adapter's unmerged output, computed in train mode (no dropout here)
        fxlora.set_adapter(gm, name)
        gm.train()
        expected[name] = gm(x).detach()
    gm.eval()
    for name in ("a", "b", None, "a"):  # switched in eval mode: the fold follows, never the previous adapter's
        fxlora.set_adapter(gm, name)
        torch.testing.assert_close(gm(x), expected[name], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage")
def test_the_forward_costs_the_same_at_every_stack_depth():
    """A generated forward's frame has a slot per node; called where the caller's CPython stack chunk
    has just room for it, each of the thousands of calls it makes used to map and unmap a chunk of its
    own (thousands of page faults, 2-6x the host time, by the caller's depth alone)."""
    import resource

    from fxlora.zoo import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=12, n_head=2, dropout=0.0)).eval()
    gm = fxlora.rewrite(model, [fxlora.Rule("transformer.h.*.attn.c_attn", r=2, alpha=2),
                                fxlora.Rule("transformer.h.*.mlp.c_fc", r=2, alpha=2)]).eval()
    x = torch.randint(0, 64, (1, 4))

    def at_depth(depth: int) -> None:
        if depth:
            return at_depth(depth - 1)
        gm(x)

    with torch.no_grad():
        gm(x)
        faults = []
        for depth in range(160):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            at_depth(depth)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults) < 100, sorted(range(160), key=faults.__getitem__)[-3:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage")
@pytest.mark.parametrize("slots", [150, 300, 1000, 1700, 3000])
def test_forwards_of_any_frame_size_get_room_for_their_calls(slots):
    """The same at the edges of CPython's chunk sizes: forwards of 150 to 3000 local slots, each making
    300 calls, cost no more than a few dozen page faults at any of 200 stack depths."""
    import resource

    from fxlora.stack_chunks import _forward_caller

    def small(a):
        return a

    names = " = ".join(f"_{i}" for i in range(slots))
    scope = {"small": small}
    exec(f"def forward(self, x):\n    if x is None:\n        {names} = None\n" + "    small(x)\n" * 300
         + "    return x\n", scope)
    forward = scope["forward"]
    call = _forward_caller(forward.__code__.co_nlocals + forward.__code__.co_stacksize)

    def at_depth(depth: int) -> None:
        if depth:
            return at_depth(depth - 1)
        call(forward, None, (1,), {})

    faults = []
    for depth in range(200):
        at_depth(depth)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        at_depth(depth)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults) < 100, (max(faults), faults.index(max(faults)))
