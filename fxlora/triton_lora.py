"""Triton kernels for the LoRA linear ops in :mod:`fxlora.ops`.

Two kernels, both with fp32 accumulation and masks for ragged edges (any ``M``, ``N``, ``K``):

* :func:`lora_shrink`: the skinny product ``h = scale * x @ A^T`` (``M x K`` by ``K x R``, ``R <= 128``),
  one program per ``BLOCK_M`` rows and all ``R`` columns, looping over ``K``;
* :func:`lora_gemm`: ``y = x @ w + bias + scale * h @ e``, the base GEMM of Triton's tutorial
  ``03-matrix-multiplication`` (grouped program ordering) with the rank-``R`` product added to the
  fp32 accumulator before the single store.  The forward pass uses it with ``w = W^T`` and
  ``e = B^T``; the backward pass with ``w = W`` and ``e = A`` for ``dx = dy @ W + dh @ A``.

Every operand is a strided 2-D view: transposes and column slices (the ``h`` of one sibling site
split from a concatenated product) cost no copy.  Offsets are computed in int32, so every operand
must span fewer than ``2**31`` elements; :mod:`fxlora.ops` sends larger ones to the
PyTorch path.

This module imports ``triton`` at import time: :mod:`fxlora.ops` imports it lazily, only when a call
takes the Triton path.  It uses the classic ``tl.load``/``tl.dot``/``tl.store`` API only and runs on
Triton 3.x (tested with 3.6 on an H200 and 3.9's CPU interpreter).

Under ``TRITON_INTERPRET=1`` (CPU tensors, for tests) the kernels launch with one small fixed
configuration instead of autotuning.  The interpreter does not implement bfloat16 arithmetic
(``tl.dot`` multiplies the raw bit patterns, triton-lang/triton#11584), so test there in float16.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["lora_shrink", "lora_gemm", "interpreting", "autotuned_configs", "MAX_RANK"]

#: The largest rank the kernels take (the rank is padded to a power of two of at least 16).
MAX_RANK = 128


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rank_block(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, triton.next_power_of_2(r))


def _m_bucket(m: int) -> int:
    # Autotuning key for the row count: powers of two, so training with varying sequence lengths
    # tunes a handful of times instead of once per length.
    return min(triton.next_power_of_2(max(m, 16)), 1 << 16)


# --------------------------------------------------------------------------------------------------
# y = x @ w + bias + scale * h @ e
# --------------------------------------------------------------------------------------------------

# Few configurations on purpose (each one is compiled per specialisation): large tiles for big
# GEMMs, smaller ones so that T=512 problems still fill the 132 SMs of an H100/H200.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
]

#: The configuration used under the interpreter: small, so that tiny test shapes are still ragged.
_GEMM_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}


@triton.jit
def _lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, e_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_hm, stride_hr, stride_er, stride_en,
    stride_ym, stride_yn,
    scale,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped ordering (tutorial 03): GROUP_M row blocks share each column block of w while it is
    # in L2.  M_BUCKET is only an autotuning key.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge wrap around, so the loads need no mask along M and N; their
    # results are garbage that the masked store drops.
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    # The rank-R term, added before the store: it is computed first, as the accumulator's initial
    # value, so it needs no registers beyond the accumulator.  The padded rank columns load as zero.
    h = tl.load(h_ptr + rm[:, None] * stride_hm + offs_r[None, :] * stride_hr, mask=offs_r[None, :] < R, other=0.0)
    e = tl.load(e_ptr + offs_r[:, None] * stride_er + rn[None, :] * stride_en, mask=offs_r[:, None] < R, other=0.0)
    acc = tl.dot(h, e) * scale

    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_lora_gemm = _even_k(_lora_gemm_kernel)
_lora_gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCK_R"])(_lora_gemm)


def lora_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    e: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``x @ w + bias + scale * h @ e`` in one kernel, as a new contiguous ``(M, N)`` tensor.

    ``x`` is ``(M, K)``, ``w`` ``(K, N)``, ``bias`` ``(N,)`` or None, ``h`` ``(M, R)``, ``e`` ``(R, N)``,
    all of one floating dtype (float16 or bfloat16 on a GPU), any strides.  Products accumulate in
    fp32, bias and the rank-R term are added in fp32, and the result is rounded once.
    """
    M, K = x.shape
    N = w.shape[1]
    R = h.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    args = (
        x, w, x if bias is None else bias, h, e, y,
        M, N, K, R, _m_bucket(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        h.stride(0), h.stride(1), e.stride(0), e.stride(1),
        y.stride(0), y.stride(1),
        float(scale),
    )  # fmt: skip
    meta = {"HAS_BIAS": bias is not None, "BLOCK_R": _rank_block(R)}

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)

    if interpreting():
        _lora_gemm[grid(_GEMM_INTERPRET)](*args, **meta, **_GEMM_INTERPRET)
    else:
        _lora_gemm_tuned[grid](*args, **meta)
    return y


# --------------------------------------------------------------------------------------------------
# h = scale * x @ A^T
# --------------------------------------------------------------------------------------------------

# The shrink reads x once and does little arithmetic: it is bound by memory bandwidth, so the
# configurations trade rows per program (more programs in flight) against the K step.
_SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_stages=3, num_warps=4),
]

_SHRINK_INTERPRET = {"BLOCK_M": 16, "BLOCK_K": 16}


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    scale,
    EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = offs_m % M  # wrapped rows: see _lora_gemm_kernel
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r[None, :] < R

    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # A^T tile, (BLOCK_K, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(a_ptrs, mask=r_ok, other=0.0)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & r_ok, other=0.0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    acc = acc * scale
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & r_ok)


_lora_shrink = _even_k(_lora_shrink_kernel)
_lora_shrink_tuned = triton.autotune(configs=_SHRINK_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R"])(_lora_shrink)


def lora_shrink(x: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ A^T`` as a new contiguous ``(M, R)`` tensor; ``x`` is ``(M, K)``, ``A`` ``(R, K)``,
    ``R <= 128``, any strides, fp32 accumulation and one rounding."""
    M, K = x.shape
    R = A.shape[0]
    h = torch.empty((M, R), device=x.device, dtype=x.dtype)
    args = (
        x, A, h, M, K, R, _m_bucket(M),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), h.stride(0), h.stride(1),
        float(scale),
    )  # fmt: skip
    meta = {"BLOCK_R": _rank_block(R)}

    def grid(cfg):
        return (triton.cdiv(M, cfg["BLOCK_M"]),)

    if interpreting():
        _lora_shrink[grid(_SHRINK_INTERPRET)](*args, **meta, **_SHRINK_INTERPRET)
    else:
        _lora_shrink_tuned[grid](*args, **meta)
    return h


def autotuned_configs() -> dict[str, str]:
    """The configuration the autotuner chose for each key so far, for benchmark reports:
    ``{"gemm (M bucket, N, K, rank block)": "BLOCK_M: 128, ...", "shrink (M bucket, K, rank block)": ...}``."""
    out = {}
    for name, tuner, n_key in (("gemm", _lora_gemm_tuned, 4), ("shrink", _lora_shrink_tuned, 3)):
        for key, cfg in tuner.cache.items():
            out[f"{name} {tuple(key[:n_key])}"] = str(cfg)
    return out
