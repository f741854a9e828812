""":func:`fold`: the deployable model, the base graph with merged weights, as a new module."""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch.fx import GraphModule

from .errors import ArgumentError
from .passes import FoldPass
from .provenance import active_adapters, adapter_state, adapters_of, require_sites
from .tracing import copy_graph_module

__all__ = ["fold"]


def fold(
    gm: GraphModule, *, dtype: torch.dtype | None = None, adapters: Mapping[str, float] | None = None
) -> GraphModule:
    """A new plain ``GraphModule`` with the LoRA updates folded into the weights.

    Each merged weight is ``W + sum(coeff * delta)`` over ``adapters`` (adapter name -> coefficient;
    default: the active adapters, 1 each), computed in float32 (float64 for float64 weights) and rounded
    once, to ``dtype`` when given (the other floating-point parameters and buffers are cast to it too)
    or to the base weight's dtype.  The result has the base model's graph and state-dict keys; tensors
    that were not adapted are shared with ``gm``, and ``gm`` itself is not modified.
    """
    require_sites(gm, "fold")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentError(f"fold(dtype=...) must be a floating-point torch.dtype, got {dtype!r}.")
    if adapters is not None:
        if not isinstance(adapters, Mapping):
            raise ArgumentError(f"fold(adapters=...) takes a dict of adapter name -> weight, got {type(adapters).__name__}.")
        known = adapters_of(gm)
        for name, coeff in adapters.items():
            if name not in known:
                raise ArgumentError(
                    f"fold(adapters=...): no adapter named {name!r}; this module has {', '.join(map(repr, known))}."
                )
            if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff):
                raise ArgumentError(f"fold(adapters=...): the weight of {name!r} must be a finite number, got {coeff!r}.")
    names = list(adapters) if adapters is not None else active_adapters(gm)
    trained = adapter_state(gm).get("train_modules", {})
    owners: dict[str, str] = {}
    for name in names:
        for path in trained.get(name, {}):
            if path in owners:
                raise ArgumentError(f"fold: adapters {owners[path]!r} and {name!r} both train module '{path}' in full.")
            owners[path] = name
            if adapters is not None and adapters[name] != 1:
                raise ArgumentError(
                    f"fold: adapter {name!r} trains module '{path}' in full, which cannot be scaled: fold it with weight 1."
                )
    out = copy_graph_module(gm)
    FoldPass(dtype, adapters)(out)
    if dtype is not None:
        out.to(dtype)
    return out
