"""The causal-attention pass (``fxlora.passes.causal_attention``), run by every ``torch.export`` capture: a
mask computed from the lengths alone and causal at every length becomes ``is_causal=True``, repeated
key/value heads ``enable_gqa=True``; anything else is kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxlora
from fxlora.passes import causal_attention
from tests.hf_models import DEC, T, ids

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def attention_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def is_causal_call(node) -> bool:
    return node.args[3] is None and node.args[5] is True


def capture(model, *args, causal=True, **kwargs):
    return fxlora.capture(model, example_inputs=args, example_kwargs=kwargs, capture="export", causal_attention=causal)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**DEC)).eval()  # 4 query heads, 2 key/value heads


@pytest.fixture(scope="module")
def llama_captures(llama):
    return capture(llama, ids(), use_cache=False), capture(llama, ids(), use_cache=False, causal=False)


def test_a_decoder_capture_attends_causally_with_shared_heads_as_the_model_does_eagerly(llama, llama_captures):
    gm, kept = llama_captures
    calls = attention_calls(gm)
    assert len(calls) == 2 and all(is_causal_call(n) and n.kwargs.get("enable_gqa") is True for n in calls)
    for n in calls:  # the key and value are the projections' heads, not their repeats
        assert n.args[1].meta["val"].shape[1] == 2 and n.args[2].meta["val"].shape[1] == 2
    assert not any(n.target is torch.ops.aten.expand.default for n in gm.graph.nodes if any(u in calls for u in n.users))
    assert all(n.args[3] is not None for n in attention_calls(kept))  # causal_attention=False keeps the mask
    assert len(gm.graph.nodes) < len(kept.graph.nodes) - 40  # the mask's construction and the repeats are gone
    for b, s in [(1, 5), (3, 23), (2, 8)]:
        x = ids((b, s), seed=b + s)
        want = llama(input_ids=x, use_cache=False).logits
        torch.testing.assert_close(gm(x).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept(x).logits, want, rtol=1e-5, atol=1e-5)


def test_the_rewrite_trains_and_folds_the_same_with_the_causal_attention(llama, llama_captures):
    gm, kept = llama_captures
    rules = [fxlora.Rule("model.layers.*.self_attn.*_proj", r=4, alpha=8)]
    grads = []
    for captured in (gm, kept):
        torch.manual_seed(1)
        lm = fxlora.rewrite(captured, rules)
        factors = [lm.get_parameter(name) for name in fxlora.lora_parameter_names(lm)]
        for p in factors:
            torch.nn.init.normal_(p, std=0.2)  # B != 0: the branches change the output
        x = ids((2, 12), seed=3)
        lm(x).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in factors])
        with torch.no_grad():
            torch.testing.assert_close(fxlora.fold(lm)(x).logits, lm(x).logits, rtol=1e-4, atol=1e-5)
        assert sum(map(is_causal_call, attention_calls(fxlora.fold(lm)))) == (2 if captured is gm else 0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_mask_read_from_an_input_is_kept(llama):
    gm = capture(llama, ids(), attention_mask=torch.ones(2, 8, dtype=torch.long), use_cache=False)
    assert attention_calls(gm) and not any(map(is_causal_call, attention_calls(gm)))
    x, pad = ids((2, 9), seed=5), torch.tensor([[1] * 9, [0, 0] + [1] * 7])
    torch.testing.assert_close(gm(x, attention_mask=pad).logits, llama(input_ids=x, attention_mask=pad, use_cache=False).logits,
                               rtol=1e-5, atol=1e-5)


def test_a_sliding_window_longer_than_the_capture_is_kept():
    """Captured at 8 tokens, the window of 10 masks nothing yet: the check's lengths around 10 see it."""
    torch.manual_seed(0)
    model = T.MistralForCausalLM(T.MistralConfig(**DEC, sliding_window=10)).eval()
    gm = capture(model, ids(), use_cache=False)
    assert not any(map(is_causal_call, attention_calls(gm)))
    x = ids((1, 30), seed=2)
    torch.testing.assert_close(gm(x).logits, model(input_ids=x, use_cache=False).logits, rtol=1e-5, atol=1e-5)


class MaskedAttention(nn.Module):
    """One attention over 2 heads of 4 with a mask built in the ways ``kind`` names."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("lower", torch.ones(64, 64, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = x.view(b, s, 2, 4).transpose(1, 2)
        i = torch.arange(s, device=x.device)
        causal = i[:, None] >= i[None, :]
        mask = {
            "causal": lambda: causal,
            "additive": lambda: torch.zeros(s, s).masked_fill(~causal, float("-inf")),
            "window": lambda: causal & (i[:, None] - i[None, :] < 50),
            "buffer": lambda: self.lower[:s, :s],
            "upper": lambda: i[:, None] <= i[None, :],
            "random": lambda: causal | (torch.rand(s, s) > 2.0),
        }[self.kind]()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(b, s, 8)


@pytest.mark.parametrize(
    ("kind", "becomes_causal"),
    [("causal", True), ("additive", True), ("window", False), ("buffer", False), ("upper", False), ("random", False)],
)
def test_only_a_mask_computed_from_lengths_and_causal_at_every_length_becomes_is_causal(kind, becomes_causal):
    model = MaskedAttention(kind)
    gm = capture(model, torch.randn(2, 6, 8))
    (call,) = attention_calls(gm)
    assert is_causal_call(call) is becomes_causal
    x = torch.randn(3, 60, 8)  # beyond the window of 50
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_pass_changes_nothing_twice_and_the_option_is_checked(llama_captures):
    gm, _ = llama_captures
    before = len(gm.graph.nodes)
    assert not causal_attention(gm).modified and len(gm.graph.nodes) == before
    with pytest.raises(fxlora.ArgumentError, match="causal_attention must be True or False"):
        fxlora.CaptureOptions(causal_attention="yes")
