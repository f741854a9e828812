"""Quantized base weights (QLoRA): LoRA over weights stored as quantized tensor subclasses.

A base layer whose weight is a quantized tensor subclass — torchao's ``NF4Tensor`` (``to_nf4``, as
torchtune's QLoRA stores weights) or the ``Int8Tensor`` / ``AffineQuantizedTensor`` of
``torchao.quantization.quantize_(model, Int8WeightOnlyConfig())`` — is a site like any other in a
symbolically traced graph:

* the base layer runs as the subclass runs it (its own kernel, dequantizing on the fly), frozen;
* the LoRA factors are created in the weight's compute dtype (``weight.dtype``, bfloat16 for a bf16
  model), so the branch runs in that dtype, and only they train;
* :func:`fxlora.fold` merges into the dequantized weight (``W + delta`` computed in float32 and rounded
  once) and returns dense weights in the compute dtype (or ``dtype=``); ``requantize=fn`` quantizes each
  merged weight of a quantized site again (``fn(dense) -> tensor``, e.g. ``torchao.quantization.to_nf4``);
* ``fxlora.report(gm, fidelity=fn)`` says per site how much of the trained update survives
  re-quantizing with ``fn`` (usually little: a 4-bit grid is far coarser than a LoRA update).

A tensor subclass is dequantized with its ``get_original_weight()`` (NF4) or ``dequantize()``
(torchao's other tensors, and anything that follows that convention); one that has neither raises
:class:`~fxlora.errors.FoldError` naming the weight and its type. ``torch.export`` flattens tensor
subclasses into their inner tensors, so a quantized weight is a site only in symbolically traced graphs
(``capture="symbolic"``); a rule that selects one in a torch.export graph raises ``RuleError`` saying so.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .distributed import is_sharded
from .errors import FoldError
from .lora import SiteSpec, delta_weight, merged_weight, update_survival

__all__ = ["is_quantized", "dense", "requantized", "requantize_fidelity", "stored_bytes"]


def is_quantized(t: Any) -> bool:
    """Whether ``t`` is a tensor subclass that wraps other tensors (a quantized weight), not a ``DTensor``."""
    return isinstance(t, torch.Tensor) and is_traceable_wrapper_subclass(t) and not is_sharded(t)


def dense(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` dequantized to a plain tensor of its compute dtype (``t`` itself when it is not quantized);
    ``what`` names it in the error raised when it cannot be dequantized."""
    if not is_quantized(t):
        return t
    for method in ("get_original_weight", "dequantize"):
        fn = getattr(t, method, None)
        if not callable(fn):
            continue
        try:
            with torch.no_grad():
                out = fn()
        except TypeError:
            continue  # another signature (NF4Tensor.dequantize is a static helper of two arguments)
        if isinstance(out, torch.Tensor) and not is_traceable_wrapper_subclass(out) and tuple(out.shape) == tuple(t.shape):
            return out.detach().to(t.dtype)
    raise FoldError(
        f"{what} is a {type(t).__name__}, which fxlora cannot dequantize: it has no get_original_weight() or "
        "dequantize() returning a plain tensor of its shape. Dequantize the model's weights first, or give the type "
        "such a method. Nothing was folded."
    )


def requantized(value: torch.Tensor, quantize: Callable[[torch.Tensor], Any], what: str) -> torch.Tensor:
    """``quantize(value)`` checked: a tensor of ``value``'s shape (FoldError naming ``what`` otherwise)."""
    try:
        out = quantize(value)
    except Exception as e:  # noqa: BLE001 - whatever the user's quantizer raises, named with the site
        raise FoldError(f"requantize failed on {what}: {type(e).__name__}: {e}. Nothing was folded.") from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(value.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FoldError(
            f"requantize returned {got} for {what}, a weight of shape {tuple(value.shape)}: it must return a tensor of "
            "the weight's shape. Nothing was folded."
        )
    return out


def requantize_fidelity(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, spec: SiteSpec, quantize: Callable[[torch.Tensor], Any]
) -> tuple[float, float]:
    """How much of a site's update survives folding into a quantized weight: as
    :func:`fxlora.lora.fold_fidelity`, with ``effective = dequantize(quantize(W + delta)) - W`` against
    the float32 update ``delta``, ``W`` the (dequantized) base weight the adapter was trained on."""
    what = f"the weight of site '{spec.name}'"
    base = dense(W, what)
    merged = merged_weight(base, [(A.detach(), B.detach(), spec, 1.0)])
    effective = dense(requantized(merged, quantize, what), what).float() - base.float()
    return update_survival(effective, delta_weight(A.detach(), B.detach(), spec).float())


def stored_bytes(t: torch.Tensor) -> int:
    """The bytes ``t`` occupies: a quantized tensor's inner tensors (its codes, scales, ...), not its
    logical ``numel() * element_size()``."""
    if not is_quantized(t):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(stored_bytes(getattr(t, name)) for name in names)
