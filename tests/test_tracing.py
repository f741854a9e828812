"""fxlora.tracing: capture leaves the model untouched, shares its weights, and says what failed."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
from fxlora import FxLoraError, Rule, TraceError
from torch import nn

from helpers import build_case, randomize_lora


def test_untraceable_model_names_the_construct():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(TraceError) as info:
        fxlora.rewrite(Branchy(), [fxlora.Rule("fc", r=1, alpha=1)])
    msg = str(info.value)
    assert "Branchy" in msg and "if x.sum() > 0" in msg and "test_tracing.py" in msg and "concrete_args" in msg
    assert isinstance(info.value, FxLoraError)




def test_rewrite_leaves_the_input_model_unchanged_and_copies_no_weight():
    model, x, rules = build_case("transformer")
    model.blocks[1].ln.weight.requires_grad_(False)  # a flag rewrite must preserve
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    out = model(*x)
    modules = dict(model.named_modules())

    gm = fxlora.rewrite(model, rules, bias="all")
    randomize_lora(gm)
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    gm.train()
    gm(*x).square().mean().backward()
    opt.step()

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[k] is m for k, m in model.named_modules())
    assert torch.equal(model(*x), out)

    # Base weights are shared (same storage), not copied: the added memory is the LoRA parameters
    # (and, here, the biases that bias="all" trains, which get storage of their own).
    base_ptrs = {p.data_ptr() for p in model.parameters()}
    lora = set(fxlora.lora_parameter_names(gm))
    added = 0
    for name, p in gm.named_parameters():
        if name in lora:
            added += p.numel()
            continue
        if name.endswith(".bias"):
            assert p.data_ptr() not in base_ptrs
            continue
        assert p.data_ptr() in base_ptrs, name
    assert added == sum(gm.get_parameter(n).numel() for n in lora)


def test_rewrite_accepts_a_graph_module_and_leaves_it_unchanged():
    model, x, rules = build_case("transformer")
    traced = torch.fx.symbolic_trace(model)
    code = traced.code
    gm = fxlora.rewrite(traced, rules)
    assert traced.code == code and not any("fxlora" in n.meta for n in traced.graph.nodes)
    assert torch.equal(gm(*x), traced(*x))


class Counter(nn.Module):
    """Updates its state inside forward(): a step counter and an EMA of the inputs, as buffers."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(4))
        self.calls = 0

    def forward(self, x):
        if self.how == "counter":
            self.steps += 1
        elif self.how == "ema":
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        elif self.how == "reassigned":
            self.steps = self.steps + 1
        elif self.how == "python":
            self.calls += 1
        return self.fc(x) + self.ema + self.steps + self.calls


@pytest.mark.parametrize("how", ["counter", "ema", "reassigned"])
def test_buffers_updated_in_forward_are_refused_by_symbolic_tracing_and_kept_by_export(how):
    model = Counter(how)
    with pytest.raises(TraceError) as info:
        fxlora.rewrite(model, [fxlora.Rule("fc", r=1, alpha=1)], capture="symbolic")
    name = "ema" if how == "ema" else "steps"
    assert f"updates the buffer '{name}'" in str(info.value) and "capture='export'" in str(info.value)
    x = torch.randn(3, 4)
    gm = fxlora.rewrite(model, [fxlora.Rule("fc", r=1, alpha=1)], example_inputs=(x,))  # auto: falls back to export
    assert gm.meta["fxlora_capture"] == "torch.export"
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for _ in range(3):  # the update is kept: the rewritten module tracks the model call after call
            torch.testing.assert_close(gm(x), reference(x))
    assert torch.equal(model.steps, torch.zeros(())) and torch.equal(model.ema, torch.zeros(4))  # the model is untouched


def test_a_python_attribute_updated_in_forward_is_refused_by_every_capture():
    x = torch.randn(3, 4)
    for capture in ("symbolic", "export"):
        with pytest.raises(TraceError, match="changes the Python attribute 'calls'.*register_buffer"):
            fxlora.rewrite(Counter("python"), [fxlora.Rule("fc", r=1, alpha=1)], capture=capture, example_inputs=(x,))


def test_folded_state_dict_loads_into_the_users_model():
    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
            self.register_buffer("shift", torch.ones(4))

        def forward(self, x):
            return self.fc(x) * self.scale + self.shift + torch.tensor([1.0, 2.0, 3.0, 4.0])  # a lifted constant

    torch.manual_seed(0)
    model = WithBuffers()
    x = torch.randn(3, 4)
    for capture in ("symbolic", "export"):
        gm = fxlora.rewrite(model, [fxlora.Rule("fc", r=2, alpha=2)], capture=capture, example_inputs=(x,))
        randomize_lora(gm)
        folded = fxlora.fold(gm)
        assert set(folded.state_dict()) == set(model.state_dict())  # non-persistent buffers and constants stay out
        with torch.no_grad():
            expected = folded(x)
        before = copy.deepcopy(model)
        assert torch.equal(model(x), before(x))  # rewrite and fold changed nothing in the model
        target = copy.deepcopy(model)
        target.load_state_dict(folded.state_dict(), strict=True)
        torch.testing.assert_close(target(x), expected)
        target = copy.deepcopy(model)
        assert fxlora.load_folded(target, gm) == ([], [])  # the helper folds a rewritten module itself
        torch.testing.assert_close(target(x), expected)
    with pytest.raises(fxlora.CheckpointError, match="does not fit this model.*Nothing was loaded"):
        fxlora.load_folded(nn.Sequential(nn.Linear(4, 4)), folded)


class TiedLM(nn.Module):
    """An embedding and a head that share one weight, and a frozen projection between them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.emb(ids))))


@pytest.mark.parametrize("capture", ["symbolic", "export"])
def test_load_folded_leaves_the_rewritten_module_and_its_folds_as_they_were(capture):
    torch.manual_seed(0)
    model = TiedLM()
    model.proj.bias.requires_grad_(False)
    ids = torch.randint(0, 20, (2, 5))
    gm = fxlora.rewrite(model, [Rule("proj", r=2, alpha=4), Rule("head", r=2, alpha=4)], capture=capture, example_inputs=(ids,))
    randomize_lora(gm, std=0.3)
    base_emb = model.emb.weight.detach().clone()
    proj_w = model.proj.weight.detach().clone()
    with torch.no_grad():
        before = gm(ids)
        earlier = fxlora.fold(gm)
        # an independent reference: the model with W + scale * B @ A written by hand
        ref = copy.deepcopy(model)
        sites = fxlora.graph_sites(gm)
        assert sorted(spec.kind for spec in sites.values()) == ["linear", "tied"]
        for spec in sites.values():  # both stored (rows, cols) = (out, in): W += B @ A * alpha / r
            ref.get_parameter(spec.weight).add_(gm.get_parameter(spec.lora_B) @ gm.get_parameter(spec.lora_A) * 2.0)
        expected = ref(ids)
        assert not torch.allclose(expected, model(ids), atol=1e-3)
        torch.testing.assert_close(before, expected, atol=1e-5, rtol=1e-5)
        assert fxlora.load_folded(model, gm) == ([], [])
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
        # neither the rewritten module nor any fold of it changed: the update is not applied twice
        assert torch.equal(gm(ids), before)
        torch.testing.assert_close(fxlora.fold(gm)(ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(earlier(ids), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(gm.get_parameter("emb.weight"), base_emb) and torch.equal(gm.get_parameter("proj.weight"), proj_w)
    # the model's own ties, requires_grad flags, dtype and device are kept
    assert model.head.weight is model.emb.weight and isinstance(model.emb.weight, nn.Parameter)
    assert model.proj.weight.requires_grad and not model.proj.bias.requires_grad
    assert model.proj.weight.dtype == torch.float32
    # the model holds its own copy: training it does not change the folded module it was loaded from,
    # and attributes set on a parameter survive
    folded = fxlora.fold(gm)
    with torch.no_grad():
        model.proj.weight.add_(1.0)  # values that differ, so that load_folded replaces the parameter
    model.proj.weight.custom_flag = True
    old = model.proj.weight
    fxlora.load_folded(model, folded)
    assert model.proj.weight is not old and getattr(model.proj.weight, "custom_flag", False)
    assert model.proj.weight.data_ptr() != folded.get_parameter("proj.weight").data_ptr()
    with torch.no_grad():
        model.proj.weight.add_(1.0)
        torch.testing.assert_close(folded(ids), expected, atol=1e-5, rtol=1e-5)
    # a float64 fold loads into the float32 model as float32
    fxlora.load_folded(model, fxlora.fold(gm, dtype=torch.float64))
    assert model.emb.weight.dtype == torch.float32 and model.head.weight is model.emb.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(gm(ids), before)


class _EMA(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("ema", torch.zeros(4))
        self.write = write

    def forward(self, x):
        self.write(self, x)
        return self.lin(x) + self.ema


BUFFER_WRITES = {
    "ema.copy_(0.9 * ema + 0.1 * mean)": lambda s, x: s.ema.copy_(0.9 * s.ema + 0.1 * x.mean(0)),
    "ema[0] = x.sum()": lambda s, x: s.ema.__setitem__(0, x.sum()),
    "ema.lerp_(mean, 0.1)": lambda s, x: s.ema.lerp_(x.mean(0), 0.1),
    "ema.view(2, 2).add_(mean)": lambda s, x: s.ema.view(2, 2).add_(x.mean(0).view(2, 2)),
    "ema.index_put_((idx,), mean)": lambda s, x: s.ema.index_put_((torch.tensor([1, 2]),), x.mean(0)[:2]),
    "ema.type_as(x).copy_(...)": lambda s, x: s.ema.type_as(x).copy_(0.9 * s.ema + 0.1 * x.mean(0)),  # returns ema itself
    "torch._foreach_copy_([ema], [...])": lambda s, x: torch._foreach_copy_([s.ema], [0.5 * s.ema + x.mean(0)]),
}


@pytest.mark.parametrize("spelling", sorted(BUFFER_WRITES))
def test_a_buffer_written_in_the_traced_graph_is_refused_or_captured_with_export(spelling):
    torch.manual_seed(0)
    model = _EMA(BUFFER_WRITES[spelling])
    x = torch.randn(3, 4)
    with pytest.raises(TraceError, match="writes into the buffer 'ema' in place.*capture='export'"):
        fxlora.rewrite(model, [Rule("lin", r=2, alpha=2)], capture="symbolic")
    # capture="auto" with example inputs falls back to torch.export, which keeps the update
    gm = fxlora.rewrite(model, [Rule("lin", r=2, alpha=2)], example_inputs=(x,))
    assert gm.meta["fxlora_capture"] == "torch.export"
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for _ in range(3):  # the model and the rewritten module drift apart from the second call if not
            torch.testing.assert_close(gm(x), reference(x))


def test_a_plain_tensor_attribute_written_in_the_traced_graph_is_refused():
    class Stats(nn.Module):  # not a registered buffer: a tensor attribute
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.stats = torch.zeros(4)

        def forward(self, x):
            self.stats.copy_(0.9 * self.stats + 0.1 * x.mean(0))
            return self.lin(x) + self.stats

    with pytest.raises(TraceError, match="writes into the tensor attribute 'stats' in place"):
        fxlora.rewrite(Stats(), [Rule("lin", r=2, alpha=2)], capture="symbolic")


def test_a_model_that_only_reads_its_buffers_is_traced_symbolically():
    model = _EMA(lambda s, x: None)
    gm = fxlora.rewrite(model, [Rule("lin", r=2, alpha=2)], example_inputs=(torch.randn(3, 4),))
    assert gm.meta["fxlora_capture"] == "symbolic_trace"
