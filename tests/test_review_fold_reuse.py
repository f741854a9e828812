"""Outside review of 8cc460e (the first fold of a rewritten capture reuses the captured graph's code, the
template graph built lazily), 65e41e4 (fold looks tensors up through the registries, shallow_copy) and
e9f1e43 (the split-LoRA B built by one block_diag or one pad).

Every fold is compared with an independent reference: a deep copy of the base model whose weights get
``W + scale * B_full @ A`` added by hand (B_full placed block by block here, not by fxlora), or loralib's
``MergedLinear``.  LoRA factors are made non-zero first.  The review found five bugs, each now a test
here: a capture or rewrite whose graph was edited without ``recompile()`` (the reused code must follow the
graph), a capture of a capture that could not be pickled, two threads reading the graphs of two folds of
one template, and a fold in eval mode after one in training mode (the modes of the first fold were kept).
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
import time

import fxlora
import loralib
import pytest
import torch
import torch.nn.functional as F
from fxlora.folding import BASE_CODE
from fxlora.provenance import adapters_of
from helpers import block_structured_B
from torch import nn

ATOL = 1e-5


# --------------------------------------------------------------------------------------------- #
# helpers: a small model with every kind of site, an independent reference fold
# --------------------------------------------------------------------------------------------- #


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.qkv = nn.Linear(8, 12)
        self.fc = nn.Linear(12, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, idx):
        h = torch.tanh(self.qkv(self.emb(idx)))
        h = self.fc(h)
        h = self.bn(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(h)


RULES = [
    fxlora.Rule("qkv", r=2, alpha=4, enable_lora=[True, False, True]),
    fxlora.Rule("emb", r=2, alpha=2),
    fxlora.Rule("conv", r=2, alpha=2),
    fxlora.Rule("fc", r=3, alpha=3),
]


def _net():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randint(0, 20, (2, 6))


def _randomize(gm, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in fxlora.lora_parameter_names(gm):
            p = gm.get_parameter(name)
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def _reference(model: nn.Module, gm, weights: dict[str, float]) -> nn.Module:
    """A deep copy of ``model`` with each adapter's update added to its weights by hand."""
    ref = copy.deepcopy(model)
    specs = adapters_of(gm)
    with torch.no_grad():
        for adapter, coeff in weights.items():
            for spec in specs[adapter].values():
                A = gm.get_parameter(spec.lora_A).detach().double()
                B = gm.get_parameter(spec.lora_B).detach().double()
                W = ref.get_parameter(spec.weight)
                if spec.kind == "linear":
                    d = block_structured_B(B, spec.enable_lora, spec.r, spec.out_features) @ A
                    d = d.t() if spec.fan_in_fan_out else d
                elif spec.kind == "embedding":
                    d = (B @ A).t()
                elif spec.kind == "conv":
                    d = (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(W.shape)
                else:  # pragma: no cover - not used here
                    raise AssertionError(spec.kind)
                W += (coeff * spec.scale * d).to(W.dtype)
    return ref


def _code_is_graph(folded) -> bool:
    return folded.graph.python_code("self").src == folded.code


# --------------------------------------------------------------------------------------------- #
# e9f1e43: the split-LoRA B (block_diag / pad)
# --------------------------------------------------------------------------------------------- #

MASKS = [(True, False, True), (False, True, False), (True, True, False, True), (True,), (False, False, True, False)]


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "x@W"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("T" if b else "F" for b in m))
def test_split_lora_values_gradients_and_fold_equal_loralib(mask, fan_in_fan_out):
    n = len(mask)
    torch.manual_seed(0)
    oracle = loralib.MergedLinear(8, 4 * n, r=2, lora_alpha=4, enable_lora=list(mask), fan_in_fan_out=fan_in_fan_out)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        oracle.lora_A.copy_(torch.randn(oracle.lora_A.shape, generator=g))
        oracle.lora_B.copy_(torch.randn(oracle.lora_B.shape, generator=g))
    W, b = oracle.weight.detach().clone(), oracle.bias.detach().clone()

    class Plain(nn.Module):  # the same weights; with fan_in_fan_out a functional `x @ W + b` site
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = nn.Parameter(W), nn.Parameter(b)

        def forward(self, x):
            return x @ self.w + self.b if fan_in_fan_out else F.linear(x, self.w, self.b)

    gm = fxlora.rewrite(fxlora.capture(Plain()), [fxlora.Rule("*", r=2, alpha=4, enable_lora=list(mask))])
    (A_name,) = [p for p in fxlora.lora_parameter_names(gm) if "lora_A" in p]
    (B_name,) = [p for p in fxlora.lora_parameter_names(gm) if "lora_B" in p]
    with torch.no_grad():
        gm.get_parameter(A_name).copy_(oracle.lora_A)
        gm.get_parameter(B_name).copy_(oracle.lora_B)
    x = torch.randn(5, 8)
    oracle.train()
    expected = oracle(x)
    got = gm(x)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(gm.get_parameter(A_name).grad, oracle.lora_A.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gm.get_parameter(B_name).grad, oracle.lora_B.grad, atol=1e-4, rtol=1e-5)
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(x), expected, atol=ATOL, rtol=0)
    assert _code_is_graph(folded)


@pytest.mark.parametrize("mask", [(True, False, True), (False, True, False)], ids=["TFT", "FTF"])
def test_split_lora_runs_on_meta_and_half_and_exports(mask):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 12))
    gm = fxlora.rewrite(meta, [fxlora.Rule("0", r=2, alpha=2, enable_lora=list(mask))])
    y = gm(torch.randn(3, 8, device="meta"))
    y.sum().backward()
    assert y.shape == (3, 12) and gm.get_parameter("0.lora_B").grad.shape == gm.get_parameter("0.lora_B").shape

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12))
    gm = fxlora.rewrite(model, [fxlora.Rule("0", r=2, alpha=2, enable_lora=list(mask))])
    _randomize(gm)
    x = torch.randn(3, 8)
    expected = _reference(model, gm, {"default": 1.0})(x)
    torch.testing.assert_close(gm(x), expected, atol=ATOL, rtol=0)
    ep = torch.export.export(gm, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    x5 = torch.randn(5, 8)  # another batch size: the dimension is dynamic
    torch.testing.assert_close(ep.module()(x5), gm(x5), atol=ATOL, rtol=0)
    torch.testing.assert_close(ep.module()(x), expected, atol=ATOL, rtol=0)
    half = copy.deepcopy(gm).half()
    torch.testing.assert_close(half(x.half()).float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fxlora.fold(half)(x.half()).float(), expected, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------- #
# 8cc460e / 65e41e4: folds of rewritten captures against the hand-made reference
# --------------------------------------------------------------------------------------------- #


def test_first_and_later_folds_of_a_capture_equal_the_reference():
    model, x = _net()
    gm = fxlora.rewrite(fxlora.capture(model), RULES)
    assert BASE_CODE in gm.__dict__
    _randomize(gm)
    gm.eval()
    first = fxlora.fold(gm)
    torch.testing.assert_close(first(x), _reference(model, gm, {"default": 1.0})(x), atol=ATOL, rtol=0)
    # factors changed in place: the cached template, new merged weights
    with torch.no_grad():
        gm.get_parameter("qkv.lora_B").mul_(-2)
        gm.get_parameter("emb.lora_A").add_(0.5)
    second = fxlora.fold(gm)
    torch.testing.assert_close(second(x), _reference(model, gm, {"default": 1.0})(x), atol=ATOL, rtol=0)
    assert not torch.allclose(first(x), second(x), atol=1e-3)
    for folded in (first, second):
        assert _code_is_graph(folded)
        assert sorted(folded.state_dict()) == sorted(model.state_dict())
    # the first fold's graph is read only now, after the second fold: still the base graph
    assert not any("lora" in str(n.target) for n in first.graph.nodes)


def test_adapter_switches_and_combinations_fold_to_the_reference():
    model, x = _net()
    gm = fxlora.rewrite(fxlora.capture(model), RULES)
    fxlora.add_adapter(gm, [fxlora.Rule("qkv", r=1, alpha=2, enable_lora=[True, False, True]), fxlora.Rule("fc", r=2, alpha=2)], "b")
    fxlora.add_adapter(gm, [fxlora.Rule("qkv", r=2, alpha=2, enable_lora=[False, True, False]), fxlora.Rule("head", r=1, alpha=1)], "d")
    _randomize(gm)
    gm.eval()
    for weights in ({"default": 1.0}, {"default": 1.0, "b": 0.5}, {"b": -1.0, "d": 2.0}):
        folded = fxlora.fold(gm, adapters=weights)
        torch.testing.assert_close(folded(x), _reference(model, gm, weights)(x), atol=ATOL, rtol=0)
        assert _code_is_graph(folded)
    fxlora.set_adapter(gm, ["d", "b"])
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(x), _reference(model, gm, {"b": 1.0, "d": 1.0})(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(folded(x), gm(x), atol=ATOL, rtol=0)
    fxlora.combine_adapters(gm, {"default": 1.0, "b": 0.5}, "cat", method="cat")
    fxlora.combine_adapters(gm, {"default": 1.0, "d": 2.0}, "svd", method="svd", svd_rank=6)
    torch.testing.assert_close(
        fxlora.fold(gm, adapters={"cat": 1.0})(x), _reference(model, gm, {"default": 1.0, "b": 0.5})(x), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        fxlora.fold(gm, adapters={"svd": 1.0})(x), _reference(model, gm, {"default": 1.0, "d": 2.0})(x), atol=1e-4, rtol=0
    )
    fxlora.delete_adapter(gm, "b")
    fxlora.set_adapter(gm, "default")
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(x), _reference(model, gm, {"default": 1.0})(x), atol=ATOL, rtol=0)
    assert _code_is_graph(folded)


def test_train_modules_with_buffers_fold_from_the_adapters_copy():
    model, x = _net()
    gm = fxlora.rewrite(fxlora.capture(model), RULES[:1], train_modules=["head"])
    fxlora.fold(gm)  # the template exists before the next adapter's copies do
    fxlora.add_adapter(gm, [fxlora.Rule("fc", r=2, alpha=2)], "b", train_modules=["bn", "head"])
    _randomize(gm)
    gm.eval()
    with torch.no_grad():
        gm.get_buffer("bn_b.running_mean").add_(1.0)
        gm.get_parameter("head_b.weight").mul_(2)
    folded = fxlora.fold(gm, adapters={"b": 1.0})
    fxlora.set_adapter(gm, "b")
    torch.testing.assert_close(folded(x), gm(x), atol=ATOL, rtol=0)
    assert sorted(folded.state_dict()) == sorted(model.state_dict())
    assert torch.equal(folded.get_buffer("bn.running_mean"), gm.get_buffer("bn_b.running_mean"))


@pytest.mark.parametrize("when", ["before", "after"])
def test_copies_and_pickles_of_the_rewrite_fold_to_the_reference(when):
    model, x = _net()
    gm = fxlora.rewrite(fxlora.capture(model), RULES)
    _randomize(gm)
    gm.eval()
    if when == "after":
        fxlora.fold(gm)
    expected = _reference(model, gm, {"default": 1.0})(x)
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), torch.load(buffer, weights_only=False)):
        folded = fxlora.fold(other.eval())
        torch.testing.assert_close(folded(x), expected, atol=ATOL, rtol=0)
        assert _code_is_graph(folded)
    # a fold whose graph was never read: deep copy, pickle, TorchScript
    for make in (copy.deepcopy, lambda f: pickle.loads(pickle.dumps(f)), torch.jit.script):
        folded = fxlora.fold(gm)
        torch.testing.assert_close(make(folded)(x), expected, atol=ATOL, rtol=0)


def test_dtype_changes_and_merge_on_eval_after_changes_fold_to_the_reference(tmp_path):
    model, x = _net()
    gm = fxlora.rewrite(fxlora.capture(model), RULES)
    _randomize(gm)
    gm.eval().double()  # after the rewrite, before the first fold
    folded = fxlora.fold(gm)
    assert folded.get_parameter("fc.weight").dtype == torch.float64 and folded.get_buffer("bn.running_var").dtype == torch.float64
    torch.testing.assert_close(folded(x), _reference(copy.deepcopy(model).double(), gm, {"default": 1.0})(x), atol=1e-10, rtol=0)

    gm = fxlora.rewrite(fxlora.capture(model), RULES, merge_on_eval=True)
    _randomize(gm)
    gm.eval()
    gm(x)
    with torch.no_grad():  # an in-place update, as an optimizer step
        gm.get_parameter("fc.lora_B").add_(0.5)
    torch.testing.assert_close(gm(x), _reference(model, gm, {"default": 1.0})(x), atol=ATOL, rtol=0)
    other = fxlora.rewrite(fxlora.capture(model), RULES)
    _randomize(other, seed=7)
    fxlora.save_lora(other, tmp_path / "a.safetensors")
    fxlora.load_lora(gm, tmp_path / "a.safetensors")
    torch.testing.assert_close(gm(x), _reference(model, other, {"default": 1.0})(x), atol=ATOL, rtol=0)


def test_meta_rewrite_folds_and_materializes():
    with torch.device("meta"):
        meta = Net()
    gm = fxlora.rewrite(fxlora.capture(meta), RULES)
    folded = fxlora.fold(gm)
    assert folded.get_parameter("qkv.weight").device.type == "meta" and _code_is_graph(folded)
    folded.to_empty(device="cpu")
    assert folded.get_parameter("qkv.weight").device.type == "cpu"
    model, x = _net()
    live = fxlora.rewrite(fxlora.capture(meta), RULES).eval()
    live.to_empty(device="cpu")
    source = fxlora.rewrite(fxlora.capture(model), RULES)
    _randomize(source)
    live.load_state_dict(source.state_dict())
    torch.testing.assert_close(fxlora.fold(live)(x), _reference(model, source, {"default": 1.0})(x), atol=ATOL, rtol=0)


def test_tied_weights_and_fused_siblings_of_a_capture_fold_to_the_reference():
    from fxlora import zoo

    torch.manual_seed(0)
    model = zoo.gpt2_tiny().eval()
    x = torch.randint(0, 256, (2, 8))
    rules = [
        fxlora.Rule("lm_head", r=2, alpha=4),
        fxlora.Rule("transformer.h.*.attn.c_attn", r=2, alpha=4, enable_lora=[True, True, False]),
        fxlora.Rule("transformer.h.*.mlp.c_fc", r=2, alpha=2),
    ]
    gm = fxlora.rewrite(fxlora.capture(model), rules, fuse_siblings=True)
    assert BASE_CODE in gm.__dict__
    _randomize(gm, std=0.2)
    gm.eval()
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(x), gm(x), atol=1e-4, rtol=0)
    assert folded.get_parameter("lm_head.weight") is folded.get_parameter("transformer.wte.weight")
    assert _code_is_graph(folded)


def test_a_torch_export_capture_of_hf_gpt2_folds_to_the_reference():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (2, 8))
    captured = fxlora.capture(model, capture="export", example_inputs=(ids,), example_kwargs={"use_cache": False})
    rules = [
        fxlora.Rule("transformer.h.0.attn.c_attn", r=2, alpha=4, enable_lora=[True, False, True]),
        fxlora.Rule("transformer.h.1.attn.c_attn", r=2, alpha=4, enable_lora=[False, True, False]),
        fxlora.Rule("transformer.h.*.mlp.c_fc", r=2, alpha=4),
    ]
    gm = fxlora.rewrite(captured, rules)
    assert BASE_CODE in gm.__dict__
    _randomize(gm)
    gm.eval()
    expected = _reference(model, gm, {"default": 1.0})(ids, use_cache=False).logits
    assert not torch.allclose(expected, model(ids, use_cache=False).logits, atol=1e-3)
    torch.testing.assert_close(gm(ids, use_cache=False).logits, expected, atol=ATOL, rtol=0)
    folded = fxlora.fold(gm)
    copied = copy.deepcopy(folded)  # before its graph is read
    torch.testing.assert_close(folded(ids, use_cache=False).logits, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(copied(ids, use_cache=False).logits, expected, atol=ATOL, rtol=0)
    assert _code_is_graph(folded)


# --------------------------------------------------------------------------------------------- #
# bugs
# --------------------------------------------------------------------------------------------- #


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _swap_relu(graph) -> None:
    """An in-place edit that keeps the node count (a target changed), not followed by recompile()."""
    edited = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.relu]
    assert edited
    for node in edited:
        node.target = torch.sigmoid


@pytest.mark.parametrize("entry", ["capture", "plan"])
def test_a_capture_edited_without_recompile_folds_to_what_the_rewrite_runs(entry):
    torch.manual_seed(0)
    model, x = Two().eval(), torch.randn(3, 4)
    rules = [fxlora.Rule("*", r=2, alpha=2)]
    if entry == "capture":
        captured = fxlora.capture(model)
        _swap_relu(captured.graph)
        gm = fxlora.rewrite(captured, rules)
    else:
        the_plan = fxlora.plan(model, rules)
        _swap_relu(the_plan.graph_module.graph)
        gm = fxlora.rewrite(the_plan)
    _randomize(gm)
    gm.eval()
    assert "sigmoid" in gm.code  # the rewrite generated its code from the edited graph
    folded = fxlora.fold(gm)
    torch.testing.assert_close(folded(x), gm(x), atol=ATOL, rtol=0)


def test_a_rewrite_edited_without_recompile_folds_to_a_module_whose_code_is_its_graph():
    torch.manual_seed(0)
    model, x = Two().eval(), torch.randn(3, 4)
    gm = fxlora.rewrite(fxlora.capture(model), [fxlora.Rule("*", r=2, alpha=2)])
    _randomize(gm)
    gm.eval()
    _swap_relu(gm.graph)
    folded = fxlora.fold(gm)
    torch.testing.assert_close(copy.deepcopy(folded)(x), folded(x), atol=ATOL, rtol=0)
    assert _code_is_graph(folded)


def test_a_capture_of_a_capture_pickles():
    torch.manual_seed(0)
    model, x = Two().eval(), torch.randn(3, 4)
    again = fxlora.capture(fxlora.capture(model))
    torch.testing.assert_close(pickle.loads(pickle.dumps(again))(x), model(x), atol=0, rtol=0)


def test_graphs_of_two_folds_can_be_read_from_two_threads(monkeypatch):
    torch.manual_seed(0)
    gm = fxlora.rewrite(fxlora.capture(Two()), [fxlora.Rule("*", r=2, alpha=2)])
    first, second = fxlora.fold(gm), fxlora.fold(gm)
    build = fxlora.folding.fold_graph

    def slow_build(graph):  # widens the window a thread switch needs (a large graph takes this long by itself)
        time.sleep(0.3)
        return build(graph)

    monkeypatch.setattr(fxlora.folding, "fold_graph", slow_build)
    errors: list[BaseException] = []

    def read(folded) -> None:
        try:
            assert not any("lora" in str(n.target) for n in folded.graph.nodes)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(first,)), threading.Thread(target=read, args=(second,))]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_a_fold_after_train_then_eval_runs_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    gm = fxlora.rewrite(fxlora.capture(model), [fxlora.Rule("0", r=2, alpha=2)])  # the model is in train mode
    fxlora.fold(gm)  # a first fold while training (a checkpoint taken during training, say)
    gm.eval()
    folded = fxlora.fold(gm)
    assert not any(m.training for m in folded.modules() if m is not folded)
    torch.testing.assert_close(folded(x), gm(x), atol=ATOL, rtol=0)
