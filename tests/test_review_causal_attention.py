"""Outside review of the causal-attention pass (``passes/attention_pass.py``, run by every ``torch.export``
capture; reviewed at 8f3abb6; every bug below was fixed in the commit after it, and each case now passes).

Each finding compares a capture with the eager model at a shape the capture's dynamic shapes allow.  A bug
is a pair of cases: ``causal_attention=False`` (which passes: torch.export's own graph is right) and
``causal_attention=True`` (the pass made the graph wrong, or made the capture crash, before the fix; the
reason given to ``wrong`` says how).  Behaviour that holds is tested plainly.

Bugs found (details in each test's reason):

* a length range that excludes every checked length (``Dim("seq", min=32)``, batch static) leaves the
  check nothing to evaluate, and *any* shape-only mask becomes ``is_causal`` -- a BERT encoder turns causal;
* a threshold written as a float (``diff < 20.0``) is not among the integers whose neighbourhoods are
  checked, so a sliding window of 20.0 is taken for causal (all checked lengths are <= 17);
* a threshold computed from the length (``diff < s // 2 + 10``) is checked only at 2..17 and around 2 and
  10, where it masks nothing;
* positions in bfloat16 (exact only up to 256) give a causal mask at every checked length, not at 300;
* the symbols are varied one at a time (the others at 3), so a mask that depends on two lengths jointly
  (batch == seq + 4) is never seen non-causal;
* the cut at ``sym_size`` treats a data-dependent length (``flag.nonzero().shape[0]``, an unbacked symbol)
  as a shape: a mask that reads an input through it becomes ``is_causal``;
* a data-dependent op inside a shape-only mask construction (``nonzero``) makes ``_numel_at`` raise a
  sympy ``TypeError`` out of ``fxlora.capture`` (8f3abb6 added that check outside the ``try``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import fxlora
from tests.hf_models import DEC, T, ids

SDPA = torch.ops.aten.scaled_dot_product_attention.default
TOL = dict(rtol=1e-5, atol=1e-5)


def attention_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def is_causal_call(node) -> bool:
    return len(node.args) > 5 and node.args[3] is None and node.args[5] is True


def capture(model, *args, causal=True, dynamic_shapes="auto", **kwargs):
    return fxlora.capture(model, example_inputs=args, example_kwargs=kwargs, capture="export",
                          causal_attention=causal, dynamic_shapes=dynamic_shapes)


def wrong(reason, raises=AssertionError):
    """(causal_attention=False, causal_attention=True): both must match the eager model.  ``reason`` (and
    ``raises``) record the review's account of what the True case did before the fix."""
    return [False, pytest.param(True, id="True")]


class Masked(nn.Module):
    """One attention over 2 heads of 4 (x: [b, s, 8]) with the mask ``kind`` builds from the lengths."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = x.view(b, s, 2, 4).transpose(1, 2)
        i = torch.arange(s, device=x.device)
        causal = i[:, None] >= i[None, :]
        diff = i[:, None] - i[None, :]
        if self.kind == "float_window":  # a window of 20 held as a float (config value, 0.5 * 40, ...)
            mask = causal & (diff < 20.0)
        elif self.kind == "length_window":  # a window that grows with the length
            mask = causal & (diff < s // 2 + 10)
        elif self.kind == "bf16_positions":  # positions in the model's dtype
            p = torch.arange(s, dtype=torch.bfloat16, device=x.device)
            mask = p[:, None] >= p[None, :]
        elif self.kind == "batch_and_length":  # full attention when batch == seq + 4
            mask = causal | ((torch.full((), b) - s) == 4)
        elif self.kind == "upper":
            mask = i[:, None] <= i[None, :]
        elif self.kind == "finfo_min":  # additive mask with finfo.min, not -inf
            mask = torch.zeros(s, s).masked_fill(~causal, torch.finfo(torch.float32).min)
        elif self.kind == "nonzero":  # causal, through a data-dependent op on shape-only tensors
            mask = causal | (torch.nonzero(i < 0).sum() > 0)
        else:
            raise AssertionError(self.kind)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(b, s, 8)


def check(model, causal, example, *calls, **capture_kwargs):
    gm = capture(model, example, causal=causal, **capture_kwargs)
    with torch.no_grad():
        for x in calls:
            torch.testing.assert_close(gm(x), model(x), **TOL)
    return gm


# --------------------------------------------------------------------------------------------- #
# bugs: wrong outputs
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("causal", wrong(
    "_assignments() keeps only the checked lengths (2, 3, 5, 8, 17, c-1..c+1) within each symbol's range; with "
    "the sequence Dim(min=32) and the batch static none is, it returns [] and _check's loop runs zero times, "
    "so _check returns True without evaluating the mask: BERT's all-True encoder mask becomes is_causal"))
def test_a_length_range_above_the_checked_lengths_keeps_a_bert_encoder_bidirectional(causal):
    torch.manual_seed(0)
    bert = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    vocab_size=100, max_position_embeddings=64)).eval()
    gm = capture(bert, ids((2, 40)), causal=causal, dynamic_shapes={"input_ids": {1: Dim("seq", min=32, max=64)}})
    x = ids((2, 35), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x).last_hidden_state, bert(input_ids=x).last_hidden_state, **TOL)
    assert not any(map(is_causal_call, attention_calls(gm)))


@pytest.mark.parametrize("causal", wrong(
    "same vacuous check as for BERT: an upper-triangular mask is accepted as causal when no checked length "
    "is within Dim(min=32)"))
def test_a_length_range_above_the_checked_lengths_keeps_an_upper_triangular_mask(causal):
    check(Masked("upper"), causal, torch.randn(2, 40, 8), torch.randn(2, 33, 8),
          dynamic_shapes={"x": {1: Dim("seq", min=32, max=64)}})


@pytest.mark.parametrize("causal", wrong(
    "_ints() collects only int constants, so the float 20.0 of 'diff < 20.0' adds no lengths 19..21; at every "
    "checked length (<= 17) the window masks nothing and the mask is taken for causal, wrong from 21 tokens on"))
def test_a_sliding_window_given_as_a_float_is_kept(causal):
    check(Masked("float_window"), causal, torch.randn(2, 6, 8), torch.randn(2, 5, 8), torch.randn(2, 30, 8))


@pytest.mark.parametrize("causal", wrong(
    "a threshold computed from the length (s // 2 + 10) only contributes its literals 2 and 10 to the checked "
    "lengths; at 2..17 and 9..11 it masks nothing (16 < 18), but from 22 tokens on it does"))
def test_a_window_computed_from_the_length_is_kept(causal):
    check(Masked("length_window"), causal, torch.randn(2, 6, 8), torch.randn(2, 5, 8), torch.randn(2, 30, 8))


@pytest.mark.parametrize("causal", wrong(
    "positions in bfloat16 are exact up to 256, so the mask is causal at every checked length but not at "
    "300 (rounded positions tie); the check samples no length where the dtype's precision runs out"))
def test_positions_in_bfloat16_are_kept(causal):
    check(Masked("bf16_positions"), causal, torch.randn(2, 6, 8), torch.randn(1, 300, 8))


@pytest.mark.parametrize("causal", wrong(
    "_assignments() varies one symbol at a time with the others at 3: batch 7 with sequence 3 (b - s == 4) is "
    "never evaluated, so a mask that depends on two lengths jointly is taken for causal"))
def test_a_mask_that_depends_on_batch_and_length_together_is_kept(causal):
    check(Masked("batch_and_length"), causal, torch.randn(2, 6, 8), torch.randn(2, 6, 8), torch.randn(7, 3, 8))


class FlagAttention(nn.Module):
    """Causal attention, bidirectional when the input ``flag`` (shape [1]) is set, read through nonzero."""

    def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = x.view(b, s, 2, 4).transpose(1, 2)
        i = torch.arange(s)
        bidirectional = torch.ones(flag.nonzero().shape[0], dtype=torch.bool).any()
        mask = (i[:, None] >= i[None, :]) | bidirectional
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).transpose(1, 2).reshape(b, s, 8)


@pytest.mark.parametrize("causal", wrong(
    "_dependencies() cuts every edge into aten.sym_size.int, but the size of nonzero's output is data (an "
    "unbacked symbol in [0, 1]), so the mask reads the input flag and still counts as 'shapes only'; 1 is not "
    "a checked length, the symbol stays at 0, and the mask becomes is_causal"))
def test_a_mask_that_reads_an_input_through_a_data_dependent_length_is_kept(causal):
    model = FlagAttention()
    x = torch.randn(2, 6, 8)
    gm = capture(model, x, torch.tensor([False]), causal=causal)
    with torch.no_grad():
        for flag in (torch.tensor([False]), torch.tensor([True])):
            torch.testing.assert_close(gm(x, flag), model(x, flag), **TOL)


# --------------------------------------------------------------------------------------------- #
# bug: a crash that is not fxlora's
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("causal", wrong(
    "_check() calls _numel_at() outside its try: a node of the mask's construction whose shape has an unbacked "
    "symbol (nonzero's [u0, 1]) is not in the assignment, int(u0) raises sympy's TypeError, and fxlora.capture "
    "fails with it (with causal_attention=False the capture works)", raises=TypeError))
def test_a_data_dependent_op_in_a_shape_only_mask_does_not_crash_the_capture(causal):
    check(Masked("nonzero"), causal, torch.randn(2, 6, 8), torch.randn(2, 9, 8))  # kept or is_causal: both right


# --------------------------------------------------------------------------------------------- #
# what holds
# --------------------------------------------------------------------------------------------- #


def test_a_finfo_min_additive_mask_is_kept_and_right():
    gm = check(Masked("finfo_min"), True, torch.randn(2, 6, 8), torch.randn(2, 9, 8))
    assert not is_causal_call(attention_calls(gm)[0])


def test_a_static_capture_is_checked_at_its_own_length_and_refuses_others():
    """dynamic_shapes=None: the float window masks nothing at 6 tokens, and 6 is the only length allowed."""
    model = Masked("float_window")
    gm = check(model, True, torch.randn(2, 6, 8), torch.randn(2, 6, 8), dynamic_shapes=None)
    assert is_causal_call(attention_calls(gm)[0])
    with pytest.raises(Exception):  # noqa: B017 - torch's guard, whatever its type
        gm(torch.randn(2, 30, 8))


class Shapes(nn.Module):
    """Attentions the pass must leave alone or get right: query shorter than key with a lower-right mask,
    key/value heads repeated in the tiled order (not HF's), and a mask the model also returns."""

    def forward(self, x: torch.Tensor):
        b, s, _ = x.shape
        q = x.view(b, s, 4, 4).transpose(1, 2)
        kv = x[..., :8].reshape(b, s, 2, 4).transpose(1, 2)
        i = torch.arange(s)
        causal = i[:, None] >= i[None, :]
        shorter = F.scaled_dot_product_attention(q[:, :, 1:], q, q, attn_mask=i[1:, None] >= i[None, :])
        tiled = kv[:, None].expand(b, 2, 2, s, 4).reshape(b, 4, s, 4)  # query head h reads key head h % 2
        repeated = kv.repeat(1, 2, 1, 1)
        out = F.scaled_dot_product_attention(q, tiled, tiled, attn_mask=causal)
        out = out + F.scaled_dot_product_attention(q, repeated, repeated, attn_mask=causal)
        return shorter, out, causal


def test_shorter_queries_tiled_repeats_and_a_returned_mask_are_right():
    model = Shapes()
    gm = capture(model, torch.randn(2, 6, 16))
    shorter, tiled, repeated = attention_calls(gm)
    assert not is_causal_call(shorter)
    for call in (tiled, repeated):  # causal, but the heads stay repeated: enable_gqa would pair them differently
        assert is_causal_call(call) and not call.kwargs.get("enable_gqa")
    x = torch.randn(3, 9, 16)
    with torch.no_grad():
        for got, want in zip(gm(x), model(x), strict=True):
            torch.testing.assert_close(got, want, **TOL)


class GqaDropout(nn.Module):
    """HF's repeat_kv and a causal mask, with attention dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = x.view(b, s, 4, 4).transpose(1, 2)
        kv = x[..., :8].reshape(b, s, 2, 4).transpose(1, 2)
        k = kv[:, :, None].expand(b, 2, 2, s, 4).reshape(b, 4, s, 4)
        i = torch.arange(s)
        return F.scaled_dot_product_attention(q, k, k, attn_mask=i[:, None] >= i[None, :], dropout_p=0.3 if self.training else 0.0)


def test_dropout_in_training_mode_draws_the_same_as_the_eager_model():
    model = GqaDropout().train()
    gm = capture(model, torch.randn(2, 6, 16))
    (call,) = attention_calls(gm)
    assert is_causal_call(call) and call.kwargs.get("enable_gqa") is True
    x = torch.randn(2, 11, 16)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(gm, mode)()
        torch.manual_seed(3)
        want = model(x)
        torch.manual_seed(3)
        torch.testing.assert_close(gm(x), want, **TOL)


def test_a_decoder_with_full_and_sliding_layers_changes_only_the_full_ones():
    """Qwen2 with a window of 12 on layer 1 only: layer 0 causal with shared heads, layer 1's mask kept."""
    torch.manual_seed(0)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(**DEC, use_sliding_window=True, sliding_window=12, max_window_layers=1)).eval()
    gm = capture(model, ids(), use_cache=False)
    full, sliding = attention_calls(gm)
    assert is_causal_call(full) and full.kwargs.get("enable_gqa") is True and not is_causal_call(sliding)
    with torch.no_grad():
        for b, s in [(1, 5), (2, 20)]:
            x = ids((b, s), seed=s)
            torch.testing.assert_close(gm(x).logits, model(input_ids=x, use_cache=False).logits, **TOL)


def test_an_encoder_decoder_changes_only_the_decoder_self_attention():
    torch.manual_seed(0)
    bart = T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64)).eval()
    gm = capture(bart, ids(), decoder_input_ids=ids((2, 8), seed=1), use_cache=False)  # equal lengths at capture
    assert list(map(is_causal_call, attention_calls(gm))) == [False, True, False]  # encoder, decoder, cross
    with torch.no_grad():
        for b, s, t in [(1, 5, 5), (3, 9, 13), (2, 12, 3)]:
            x, y = ids((b, s), seed=s), ids((b, t), seed=t)
            torch.testing.assert_close(gm(x, decoder_input_ids=y, use_cache=False).logits,
                                       bart(input_ids=x, decoder_input_ids=y, use_cache=False).logits, **TOL)


def test_packed_position_ids_at_capture_keep_the_mask():
    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(**DEC)).eval()
    gm = capture(llama, ids(), position_ids=torch.arange(8).expand(2, 8), use_cache=False)
    assert not any(map(is_causal_call, attention_calls(gm)))
    x, packed = ids((2, 9), seed=4), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, position_ids=packed).logits,
                                   llama(input_ids=x, position_ids=packed, use_cache=False).logits, **TOL)
