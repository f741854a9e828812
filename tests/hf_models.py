"""Tiny random-weight transformers models (2 layers, hidden 32, vocab 100; no downloads) and the inputs
each is captured and called with.  Shared by the model matrix and the Hugging Face tests.

``MODELS[name] = (factory, inputs)``: ``inputs()`` returns ``(args, kwargs)``, the minimal example call
that ``torch.export`` captures (``use_cache=False`` for decoders, ``decoder_input_ids`` for
encoder-decoders, ``pixel_values`` for vision models).
"""

from __future__ import annotations

import torch

import transformers as T

T.logging.set_verbosity_error()

VOCAB = 100


def ids(shape=(2, 8), low=0, seed=0):
    return torch.randint(low, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


DEC = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    vocab_size=VOCAB, max_position_embeddings=64,
)
MOE = dict(DEC, intermediate_size=32)


def _decoder():
    return (ids(),), {"use_cache": False}


def _seq2seq():
    return (ids(),), {"decoder_input_ids": ids((2, 4), seed=1), "use_cache": False}


def mistral():
    return T.MistralForCausalLM(T.MistralConfig(**DEC))


def gemma():  # tied embedding and LM head
    return T.GemmaForCausalLM(T.GemmaConfig(**DEC, head_dim=8))


def falcon(new_decoder_architecture: bool = True, bias: bool = False):
    """FalconLinear (``input @ self.weight.T``) for every projection; tied LM head."""
    cfg = T.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, bias=bias,
        new_decoder_architecture=new_decoder_architecture, num_kv_heads=2 if new_decoder_architecture else None,
        multi_query=not new_decoder_architecture,
    )
    return T.FalconForCausalLM(cfg)


def bloom():  # fused query_key_value, ALiBi, tied
    return T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB))


def opt():
    return T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                        vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=32))


def gpt_neox():
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64))


def t5():  # one weight shared by both embeddings and the LM head
    return T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                                   num_heads=4, vocab_size=VOCAB, decoder_start_token_id=0))


def bart():
    return T.BartForConditionalGeneration(T.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                                                       encoder_attention_heads=4, decoder_attention_heads=4,
                                                       encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                                                       max_position_embeddings=64))


def whisper():  # speech: conv1d front end, tied decoder embedding and proj_out
    cfg = T.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                          num_mel_bins=16, max_source_positions=32, max_target_positions=32,
                          decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return T.WhisperForConditionalGeneration(cfg)


def _whisper_inputs():
    return (randn(2, 16, 64),), {"decoder_input_ids": ids((2, 4), seed=1), "use_cache": False}


def distilbert():
    return T.DistilBertForSequenceClassification(T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                    vocab_size=VOCAB, max_position_embeddings=64))


def albert():  # one layer group called by both layers; tied MLM decoder
    return T.AlbertForMaskedLM(T.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
                                              max_position_embeddings=64))


def vit():
    return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, image_size=32, patch_size=8, num_labels=5))


def clip():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def mixtral(experts_implementation: str | None = None):
    return T.MixtralForCausalLM(T.MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2,
                                                experts_implementation=experts_implementation))


def qwen2_moe(experts_implementation: str | None = None):
    return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**MOE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                  shared_expert_intermediate_size=32,
                                                  experts_implementation=experts_implementation))


#: name -> (factory, inputs); the kind of architecture is in the comment.
MODELS = {
    "mistral": (mistral, _decoder),  # decoder
    "gemma": (gemma, _decoder),  # decoder, tied
    "falcon": (falcon, _decoder),  # decoder, FalconLinear, tied
    "bloom": (bloom, _decoder),  # decoder, fused qkv, tied
    "opt": (opt, _decoder),  # decoder, tied
    "gpt_neox": (gpt_neox, _decoder),  # decoder, fused qkv
    "t5": (t5, _seq2seq),  # encoder-decoder, one weight tied three ways
    "bart": (bart, _seq2seq),  # encoder-decoder, tied
    "whisper": (whisper, _whisper_inputs),  # speech encoder-decoder, conv1d, tied
    "distilbert": (distilbert, lambda: ((ids(),), {})),  # encoder
    "albert": (albert, lambda: ((ids(),), {})),  # encoder, shared layer, tied
    "vit": (vit, lambda: ((randn(2, 3, 32, 32),), {})),  # vision, conv2d
    "clip": (clip, lambda: ((ids((2, 8)),), {"pixel_values": randn(2, 3, 32, 32, seed=1)})),  # text + vision
    "mixtral": (mixtral, _decoder),  # MoE, grouped_mm experts
    "qwen2_moe": (qwen2_moe, _decoder),  # MoE, shared expert
}


def build(name: str):
    """``(model in eval mode, args, kwargs)``, seeded."""
    factory, inputs = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    args, kwargs = inputs()
    return model, args, kwargs
