"""fxlora.generation: one torch.export capture with the KV cache as inputs generates like model.generate,
and a served decoder generates each sample with its own adapter, as PEFT's adapter_names= does."""

from __future__ import annotations

import copy

import fxlora
import pytest
import torch
from fxlora import Rule
from fxlora.generation import capture_options, greedy_generate, with_static_cache

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

RULES = {"a": [Rule("model.layers.*.self_attn.[qv]_proj", r=4, alpha=8)],
         "b": [Rule("model.layers.*.mlp.[gu]*_proj", r=2, alpha=4), Rule("model.layers.0.self_attn.q_proj", r=8, alpha=8)]}
PEFT_TARGETS = {"a": (["q_proj", "v_proj"], 4, 8), "b": (["gate_proj", "up_proj"], 2, 4)}


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    # initializer_range 0.2: random logits with clear maxima, so greedy tokens do not flip on rounding
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                                   initializer_range=0.2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    gm = fxlora.rewrite(with_static_cache(model), RULES["a"], adapter="a", capture=capture_options(model))
    return model, gm


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[2, :2], mask[2, :2] = 0, 0  # a shorter, left-padded prompt
    return ids, mask


def test_one_capture_generates_like_model_generate(decoder):
    model, gm = decoder
    ids, mask = _prompts()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with fxlora.disable_adapter(gm):
        got = greedy_generate(gm, ids, attention_mask=mask, max_new_tokens=8, model=model)
    assert torch.equal(got, expected)
    assert gm.meta["fxlora_capture"] == "torch.export" and {"model.layers.0.self_attn.q_proj"} <= set(fxlora.graph_sites(gm))


def test_served_decoder_generates_each_sample_with_its_adapter_as_peft_does(decoder):
    model, gm = decoder
    gm = copy.deepcopy(gm)
    fxlora.add_adapter(gm, RULES["b"][:1], "b")  # PEFT's config: gate and up projections
    # PEFT with the same two adapters, the same factors
    targets, r, alpha = PEFT_TARGETS["a"]
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), adapter_name="a")
    targets, r, alpha = PEFT_TARGETS["b"]
    pm.add_adapter("b", peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    layers = dict(pm.base_model.model.named_modules())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for adapter in ("a", "b"):
            for site, spec in fxlora.graph_sites(gm, adapter).items():
                for ours, theirs in ((spec.lora_A, layers[site].lora_A[adapter].weight), (spec.lora_B, layers[site].lora_B[adapter].weight)):
                    value = torch.randn(theirs.shape, generator=g) * 0.3
                    gm.get_parameter(ours).copy_(value)
                    theirs.copy_(value)
    pm.eval()
    ids, mask = _prompts()
    server = fxlora.serve(gm)
    adapter_ids = torch.tensor([1, 0, -1])
    served = greedy_generate(server, ids, attention_mask=mask, max_new_tokens=8, adapter_ids=adapter_ids, model=model)
    names = ["b", "a", "__base__"]
    expected = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=8, do_sample=False)
    assert torch.equal(served, expected)
    for i, name in enumerate(["b", "a", None]):  # and each sample generated alone with its adapter
        fxlora.set_adapter(gm, name)
        alone = greedy_generate(gm, ids[i : i + 1, mask[i].argmax():], max_new_tokens=8, model=model)
        assert torch.equal(alone[0], served[i, mask[i].argmax():])
    assert not torch.equal(served[0], served[2])  # the adapters do change the tokens
