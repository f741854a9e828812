""":func:`fold`: the deployable model, the base graph with merged weights, as a new module; and
:func:`load_folded`: the merged weights back in the user's own model object."""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn.modules.module import _IncompatibleKeys

from .errors import ArgumentError, CheckpointError
from .passes import FoldPass
from .provenance import adapters_of, graph_sites, require_sites
from .tracing import copy_graph_module

__all__ = ["fold", "load_folded"]


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
    out = copy_graph_module(gm)
    FoldPass(dtype, adapters)(out)
    if dtype is not None:
        out.to(dtype)
    return out


def load_folded(model: nn.Module, folded: GraphModule) -> _IncompatibleKeys:
    """Write the merged weights of ``folded`` (the module :func:`fold` returned, or a rewritten module,
    which is folded first) into ``model``, the user's own model object, in place: a Hugging Face model
    can then ``generate`` and ``save_pretrained`` with them.  This is the only fxlora call that changes the
    model passed to :func:`fxlora.rewrite`.

    The folded module has ``model``'s state-dict keys (fxlora keeps non-persistent buffers and
    torch.export's lifted constants out of them, and tied weights under every name), so this is
    ``model.load_state_dict(folded.state_dict(), strict=True)`` with checks first: a key ``model`` lacks,
    or a tensor of another shape, raises :class:`~fxlora.errors.CheckpointError` and loads nothing.  Keys
    the folded module lacks (parameters a symbolically traced graph never reads, so that fold cannot
    have changed them) are left as they are and returned as ``missing_keys``.
    """
    if not isinstance(model, nn.Module) or not isinstance(folded, nn.Module):
        raise ArgumentError(
            f"load_folded(model, folded) takes the model and the folded module, got {type(model).__name__} and "
            f"{type(folded).__name__}."
        )
    if isinstance(folded, GraphModule) and graph_sites(folded):
        folded = fold(folded)
    source, target = folded.state_dict(), model.state_dict()
    unexpected = [k for k in source if k not in target]
    mismatched = [
        f"'{k}' {tuple(v.shape)} (the model has {tuple(target[k].shape)})"
        for k, v in source.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if unexpected or mismatched:
        problems = []
        if unexpected:
            problems.append(f"tensors the model does not have: {', '.join(unexpected[:6])}")
        if mismatched:
            problems.append(f"tensors of another shape: {', '.join(mismatched[:6])}")
        raise CheckpointError(
            "load_folded: the folded module does not fit this model (" + "; ".join(problems) + "). Pass the model "
            "that was rewritten. Nothing was loaded."
        )
    missing = [k for k in target if k not in source]
    model.load_state_dict({**{k: target[k] for k in missing}, **source}, strict=True)
    return _IncompatibleKeys(missing, [])
