"""Units: the model's blocks as graph modules whose forward runs, with names, state dicts and fold unchanged."""

from __future__ import annotations

import fxlora
import pytest
import torch
from fxlora import Rule
from torch.fx import GraphModule

from helpers import TinyTransformer, op_sequence, randomize_lora

RULES = [Rule("blocks.*.qkv", r=2, alpha=4, enable_lora=[True, False, True]), Rule("head", r=2, alpha=2, dropout=0.1)]


def _pair():
    torch.manual_seed(0)
    model = TinyTransformer()
    flat = fxlora.rewrite(model, RULES)
    randomize_lora(flat)
    split = fxlora.rewrite(model, RULES, units="blocks.*")
    fxlora.load_lora_state_dict(split, fxlora.lora_state_dict(flat))
    return model, flat.eval(), split.eval()


def test_units_run_their_own_forward_and_change_no_name():
    model, flat, split = _pair()
    for unit in ("blocks.0", "blocks.1"):
        module = split.get_submodule(unit)
        assert isinstance(module, GraphModule) and type(module).__name__ == "Block"
        assert any(n.target == unit for n in split.graph.nodes if n.op == "call_module")
    assert fxlora.passes.unit_paths(split) == ["blocks.0", "blocks.1"]
    assert list(split.state_dict()) == list(flat.state_dict())
    calls = []
    split.get_submodule("blocks.1").register_forward_pre_hook(lambda mod, args: calls.append(mod))
    x = torch.randint(0, 40, (2, 5))
    torch.testing.assert_close(split(x), flat(x))
    assert len(calls) == 1  # the block's forward ran (what FSDP2's per-block hooks need)
    folded = fxlora.fold(split)
    torch.testing.assert_close(folded(x), flat(x), atol=1e-5, rtol=1e-5)
    assert op_sequence(folded) == op_sequence(torch.fx.symbolic_trace(model))  # the flat base graph


def test_training_and_activation_checkpointing_per_unit():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    _, flat, split = _pair()
    flat.train(), split.train()
    x = torch.randint(0, 40, (2, 5))
    for unit in ("blocks.0", "blocks.1"):  # wrap each unit: its activations are recomputed in backward
        owner, _, attr = unit.rpartition(".")
        wrapped = checkpoint_wrapper(split.get_submodule(unit))
        split.get_submodule(owner)._modules[attr] = wrapped
    torch.manual_seed(1)
    flat(x).square().mean().backward()
    torch.manual_seed(1)
    split(x).square().mean().backward()
    for name in fxlora.lora_parameter_names(flat):
        torch.testing.assert_close(split.get_parameter(name.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module.")
                                                       .replace("blocks.1.", "blocks.1._checkpoint_wrapped_module.")).grad,
                                   flat.get_parameter(name).grad, atol=1e-6, rtol=1e-5)


def test_a_split_module_is_not_switched_and_bad_units_are_refused():
    _, _, split = _pair()
    with pytest.raises(fxlora.ArgumentError, match="split into units"):
        fxlora.add_adapter(split, [Rule("head", r=1, alpha=1)], "b")
    with pytest.raises(fxlora.RuleError, match=r"units\[0\] = 'block.\*' selects no module"):
        fxlora.rewrite(TinyTransformer(), RULES, units="block.*")
