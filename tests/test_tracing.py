"""fxlora.tracing: capture leaves the model untouched, shares its weights, and says what failed."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
from fxlora import FxLoraError, TraceError
from torch import nn

from helpers import (
    ConvNet,
    Functional,
    TinyTransformer,
    randomize_lora,
)


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


CASES = {
    "transformer": (
        TinyTransformer,
        lambda: (torch.randint(0, 40, (2, 6)),),
        [
            fxlora.Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]),
            fxlora.Rule("re:blocks\\.\\d+\\.proj", r=3, alpha=3),
            fxlora.Rule(nn.Embedding, r=4, alpha=8),
            fxlora.Rule("head", r=2, alpha=2),
        ],
    ),
    "convnet": (ConvNet, lambda: (torch.randn(2, 3, 11, 11),), [fxlora.Rule("c*", r=2, alpha=4), fxlora.Rule("fc", r=1, alpha=1)]),
    "functional": (Functional, lambda: (torch.randn(3, 5, 8),), [fxlora.Rule("*", r=2, alpha=4)]),
}


def _build(case):
    factory, inputs, rules = CASES[case]
    torch.manual_seed(0)
    model = factory().eval()
    return model, inputs(), rules


def test_rewrite_leaves_the_input_model_unchanged_and_copies_no_weight():
    model, x, rules = _build("transformer")
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
    model, x, rules = _build("transformer")
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
