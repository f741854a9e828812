"""PEFT as the oracle and as a format: adapters written by PeftModel.save_pretrained load into fxlora
with PEFT's numbers, and fxlora's adapters load into PeftModel.from_pretrained."""

from __future__ import annotations

import copy
import json

import fxlora
import pytest
import torch
from fxlora import CheckpointError, Rule
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

ATOL = 1e-5


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3)))


IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
CASES = {
    "gpt2": (_gpt2, (IDS,), {"use_cache": False},
             dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, r=4, lora_alpha=8)),
    "bert": (_bert, (IDS,), {},
             dict(target_modules=["query", "value", "word_embeddings"], r=4, lora_alpha=16, lora_dropout=0.1)),
    "llama": (_llama, (IDS,), {"use_cache": False},
              dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4,
                   lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"gate_proj": 3},
                   use_rslora=True)),
    "cnn": (_CNN, (torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0)),), {},
            dict(target_modules=["conv", "conv2", "fc"], r=4, lora_alpha=8)),
}


def _out(o):
    return o if isinstance(o, torch.Tensor) else (o.logits if hasattr(o, "logits") else o[0])


def _peft_model(name, folder):
    factory, x, kw, config = CASES[name]
    pm = peft.get_peft_model(factory(), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_adapter_loads_with_peft_numbers(name, tmp_path):
    factory, x, kw, _ = CASES[name]
    pm = _peft_model(name, tmp_path / "peft")
    base = factory()
    rules = fxlora.peft_rules(tmp_path / "peft")
    gm = fxlora.rewrite(base, rules, example_inputs=x, example_kwargs=kw).eval()
    fxlora.load_peft_adapter(gm, tmp_path / "peft")
    with torch.no_grad():
        expected = _out(pm(*x, **kw))
        assert not torch.allclose(expected, _out(base(*x, **kw)), atol=1e-4)
        torch.testing.assert_close(_out(gm(*x, **kw)), expected, atol=ATOL, rtol=0)
        merged = copy.deepcopy(pm).merge_and_unload()
        torch.testing.assert_close(_out(fxlora.fold(gm)(*x, **kw)), _out(merged(*x, **kw)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fxlora_adapter_loads_into_peft(name, tmp_path):
    factory, x, kw, _ = CASES[name]
    _peft_model(name, tmp_path / "peft")
    gm = fxlora.rewrite(factory(), fxlora.peft_rules(tmp_path / "peft"), example_inputs=x, example_kwargs=kw).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for v in fxlora.lora_state_dict(gm).values():
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    fxlora.save_peft_adapter(gm, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(factory(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded(*x, **kw)), _out(gm(*x, **kw)), atol=ATOL, rtol=0)


def test_rules_written_by_hand_load_a_peft_adapter(tmp_path):
    _peft_model("gpt2", tmp_path / "peft")
    x, kw = CASES["gpt2"][1:3]
    gm = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.(c_attn|c_proj)", r=4, alpha=8)], example_inputs=x, example_kwargs=kw)
    fxlora.load_peft_adapter(gm, tmp_path / "peft")


def test_mismatches_are_refused_and_load_nothing(tmp_path):
    _peft_model("gpt2", tmp_path / "peft")
    x, kw = CASES["gpt2"][1:3]

    def snapshot(gm):
        return {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}

    other_rank = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.(c_attn|c_proj)", r=2, alpha=4)], example_inputs=x, example_kwargs=kw)
    before = snapshot(other_rank)
    with pytest.raises(CheckpointError, match="r=4 and scale=2.*r=2"):
        fxlora.load_peft_adapter(other_rank, tmp_path / "peft")
    assert all(torch.equal(before[k], v) for k, v in fxlora.lora_state_dict(other_rank).items())

    fewer = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.c_attn", r=4, alpha=8)], example_inputs=x, example_kwargs=kw)
    with pytest.raises(CheckpointError, match="which the model does not"):
        fxlora.load_peft_adapter(fewer, tmp_path / "peft")

    other_model = fxlora.rewrite(_bert(), [Rule("re:.*\\.query", r=4, alpha=8)], example_inputs=x)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        fxlora.load_peft_adapter(other_model, tmp_path / "peft")

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_dora"):
        fxlora.peft_rules(tmp_path / "peft")
    with pytest.raises(CheckpointError, match="not a PEFT adapter folder"):
        fxlora.peft_rules(tmp_path / "nowhere")


def test_masked_fused_projection_cannot_be_written_for_peft(tmp_path):
    x, kw = CASES["gpt2"][1:3]
    gm = fxlora.rewrite(_gpt2(), [Rule("re:.*\\.c_attn", r=4, alpha=8, enable_lora=[True, False, True])],
                        example_inputs=x, example_kwargs=kw)
    with pytest.raises(CheckpointError, match="no per-slice mask"):
        fxlora.save_peft_adapter(gm, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_config.json").exists()
