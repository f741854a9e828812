"""fxlora.provenance: what fxlora records, and one error for a module it did not make."""

from __future__ import annotations

import fxlora
import pytest
import torch

from helpers import TinyTransformer


def test_bad_bias_mode_and_non_lora_modules():
    with pytest.raises(fxlora.ArgumentError, match="bias must be one of"):
        fxlora.rewrite(TinyTransformer(), [fxlora.Rule("head", r=1, alpha=1)], bias="some")
    plain = torch.fx.symbolic_trace(TinyTransformer())
    calls = [
        lambda m: fxlora.fold(m),
        lambda m: fxlora.lora_state_dict(m),
        lambda m: fxlora.load_lora_state_dict(m, {}),
        lambda m: fxlora.mark_only_lora_as_trainable(m),
        lambda m: fxlora.save_lora(m, "unused.safetensors"),
        lambda m: fxlora.load_lora(m, "unused.safetensors"),
        lambda m: fxlora.save_peft_adapter(m, "unused"),
        lambda m: fxlora.load_peft_adapter(m, "unused"),
        lambda m: fxlora.lora_parameter_names(m),
    ]
    for module in (plain, TinyTransformer()):  # one error type, from one helper, everywhere
        for call in calls:
            with pytest.raises(fxlora.NotRewrittenError, match="expects the graph module returned by fxlora.rewrite"):
                call(module)
