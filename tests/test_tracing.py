"""fxlora.tracing: capture leaves the model untouched, shares its weights, and says what failed."""

from __future__ import annotations

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
