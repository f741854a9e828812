"""Generation with a KV cache from one captured graph: serve a decoder, each sample with its own adapter.

A Hugging Face decoder captured as it is (``use_cache=False``) recomputes the whole prefix at every
step.  :func:`with_static_cache` returns a view of the model whose forward takes the KV cache as
tensors it writes in place (the recipe of transformers' ``TorchExportableModuleWithStaticCache``, with
the cache as inputs instead of buffers, so that batch size, step length and cache length all stay
dynamic): one ``torch.export`` capture then runs the prefill and every decode step.
:func:`capture_options` gives the example inputs and dynamic shapes for that capture, and
:func:`greedy_generate` runs greedy decoding on the captured module, rewritten or served::

    decoder = fxlora.generation.with_static_cache(model)
    gm = fxlora.rewrite(decoder, rules, capture=fxlora.generation.capture_options(model))
    fxlora.add_adapter(gm, other_rules, "b")
    server = fxlora.serve(gm)
    tokens = fxlora.generation.greedy_generate(server, prompts, max_new_tokens=16, model=model,
                                               adapter_ids=torch.tensor([0, 1, -1]))

The view shares every module and parameter with ``model`` and keeps its names (``model.layers.0...``),
so the same rules select the same sites as on the model itself.  Prompts of unequal length are
left-padded with an ``attention_mask`` (as ``generate`` expects); greedy tokens equal
``model.generate(..., do_sample=False)``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from .errors import ArgumentError
from .options import CaptureOptions

__all__ = ["with_static_cache", "capture_options", "cache_tensors", "greedy_generate"]


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ArgumentError(f"{type(model).__name__} has no Hugging Face config: fxlora.generation is for transformers decoders.")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _cache_kwarg(forward: Any) -> str:
    """The keyword under which ``forward`` takes its KV cache: ``cache`` in newer transformers (5.24 has it, and
    still maps the old name with a deprecation warning), ``past_key_values`` in older ones (5.17).  Passing the wrong one is not
    an error there: it lands in ``**kwargs`` unread, and the model runs with a fresh cache of its own."""
    try:
        params = inspect.signature(forward).parameters  # follows the decorators' __wrapped__
    except (TypeError, ValueError):
        params = {}
    for name in ("cache", "past_key_values"):
        if name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            return name
    raise ArgumentError(f"{getattr(forward, '__qualname__', forward)!r} takes neither cache= nor past_key_values=: "
                        "fxlora.generation needs a transformers decoder that takes a KV cache.")


def with_static_cache(model: nn.Module) -> nn.Module:
    """A view of the transformers decoder ``model`` (same modules and parameters, same names) whose forward
    is ``(input_ids, position_ids, cache_position, attention_mask, keys, values) -> logits``: ``keys[i]`` /
    ``values[i]`` are layer i's cache ``(batch, kv_heads, cache_len, head_dim)``, written in place at
    ``cache_position``; ``attention_mask`` is ``(batch, cache_len)``, 0 on left padding."""
    from transformers import StaticCache

    _text_config(model)
    base = type(model)
    cache_kwarg = _cache_kwarg(base.forward)

    class StaticCacheDecoder(base):  # type: ignore[misc, valid-type]
        def forward(self, input_ids, position_ids, cache_position, attention_mask, keys, values):  # noqa: D102
            cache = StaticCache(config=_text_config(self), max_cache_len=keys[0].shape[2])
            for layer, k, v in zip(cache.layers, keys, values):
                # what StaticLayer's lazy initialisation sets, minus the allocation: the layer reads, and
                # index_copy_-writes, the caller's tensors
                layer.keys, layer.values = k, v
                layer.cumulative_length = cache_position[0].clone()
                layer.dtype, layer.device = k.dtype, k.device  # 5.17's StaticLayer also records the dtype
                layer.batch_size, layer.num_heads = k.shape[0], k.shape[1]
                layer.k_head_dim, layer.v_head_dim = k.shape[-1], v.shape[-1]
                layer.is_initialized = True
            out = base.forward(self, input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                               use_cache=True, **{cache_kwarg: cache})
            return out.logits

    StaticCacheDecoder.__name__ = StaticCacheDecoder.__qualname__ = f"{base.__name__}WithStaticCache"
    view = copy.copy(model)  # shares the modules, parameters and buffers
    view.__class__ = StaticCacheDecoder
    return view.eval()


def _cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    config = _text_config(model)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return [(heads, head_dim)] * config.num_hidden_layers


def cache_tensors(model: nn.Module, batch: int, length: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed ``(keys, values)`` for ``batch`` sequences of up to ``length`` tokens."""
    ref = next(model.parameters())
    factory = {"dtype": dtype or ref.dtype, "device": device or ref.device}
    shapes = _cache_shapes(model)
    keys = [torch.zeros(batch, h, length, d, **factory) for h, d in shapes]
    values = [torch.zeros(batch, h, length, d, **factory) for h, d in shapes]
    return keys, values


def capture_options(model: nn.Module, *, batch: int = 2, prompt: int = 5, length: int = 16) -> CaptureOptions:
    """Capture options for :func:`with_static_cache` ``(model)``: example inputs of ``batch`` prompts of
    ``prompt`` tokens in a cache of ``length`` (none of them 0 or 1, which torch.export would specialise),
    and batch, step and cache length dynamic."""
    from torch.export import Dim

    if min(batch, prompt, length) < 2 or prompt > length:
        raise ArgumentError("capture_options needs batch, prompt and length of at least 2, and prompt <= length.")
    vocab = _text_config(model).vocab_size
    keys, values = cache_tensors(model, batch, length)
    example = {
        "input_ids": torch.randint(0, vocab, (batch, prompt), device=keys[0].device),
        "position_ids": torch.arange(prompt, device=keys[0].device).expand(batch, prompt),
        "cache_position": torch.arange(prompt, device=keys[0].device),
        "attention_mask": torch.ones(batch, length, dtype=torch.long, device=keys[0].device),
        "keys": keys,
        "values": values,
    }
    # Dim.AUTO lets torch.export decide each dimension (dynamic where the model allows it): named Dims
    # with ranges hit constraint errors on some transformers versions' cache and mask code.
    B = T = L = Dim.AUTO
    kv = {0: B, 2: L}
    shapes = {
        "input_ids": {0: B, 1: T},
        "position_ids": {0: B, 1: T},
        "cache_position": {0: T},
        "attention_mask": {0: B, 1: L},
        "keys": [kv] * len(keys),
        "values": [kv] * len(values),
    }
    return CaptureOptions(method="export", example_kwargs=example, dynamic_shapes=shapes)


@torch.no_grad()
def greedy_generate(
    module: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    adapter_ids: torch.Tensor | None = None,
    cache_len: int | None = None,
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Greedy decoding with ``module``, a :func:`with_static_cache` decoder as captured, rewritten or
    served (then ``adapter_ids`` picks each sample's adapter).  Returns the prompts followed by
    ``max_new_tokens`` tokens each, as ``model.generate(..., do_sample=False)`` does; unequal prompts are
    left-padded, with ``attention_mask`` 0 on the padding.  ``model`` (the decoder the module was made
    from) gives the cache shapes when ``module`` has no ``config``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    source = model if model is not None else module
    if getattr(source, "config", None) is None:
        raise ArgumentError("greedy_generate needs the decoder's config: pass model=<the transformers model>.")
    batch, prompt = input_ids.shape
    length = cache_len or prompt + max_new_tokens
    if length < prompt + max_new_tokens:
        raise ArgumentError(f"cache_len={length} is shorter than the prompt plus the new tokens ({prompt + max_new_tokens}).")
    ref = next(iter(module.parameters()), input_ids)
    keys, values = cache_tensors(source, batch, length, dtype=ref.dtype if ref.is_floating_point() else None,
                                 device=input_ids.device)
    mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
    if attention_mask is not None:
        mask[:, :prompt] = attention_mask
    extra = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    positions = (mask[:, :prompt].cumsum(-1) - 1).masked_fill(mask[:, :prompt] == 0, 0)  # generate()'s
    logits = module(input_ids=input_ids, position_ids=positions, cache_position=torch.arange(prompt, device=input_ids.device),
                    attention_mask=mask, keys=keys, values=values, **extra)
    tokens, last = [input_ids], positions[:, -1:]
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        if step == max_new_tokens - 1:
            break
        last = last + 1
        logits = module(input_ids=nxt, position_ids=last, cache_position=torch.tensor([prompt + step], device=input_ids.device),
                        attention_mask=mask, keys=keys, values=values, **extra)
    return torch.cat(tokens, dim=1)
