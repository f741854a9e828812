"""Custom ops for adapted linear sites: the base GEMM and the LoRA branch as one operator.

Public ops (namespace ``fxlora``, registered with :func:`torch.library.custom_op`, each with a fake
kernel and an autograd formula, so they run eagerly, inside ``torch.compile`` graphs without a graph
break, and through ``torch.export`` as single nodes)::

    fxlora::lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale) -> Tensor
        F.linear(x, weight, bias) + scale * F.linear(F.linear(x, A), B)
    fxlora::lora_linear_h(Tensor x, Tensor weight, Tensor? bias, Tensor h, Tensor B, float scale) -> Tensor
        F.linear(x, weight, bias) + scale * F.linear(h, B)

``x`` is ``(..., in)``, ``weight`` ``(out, in)``, ``bias`` ``(out,)``, ``A`` ``(r, in)``, ``B``
``(out, r)``, ``h`` ``(..., r)``; all of one floating dtype and device, any strides.  ``lora_linear_h``
is for branches whose input differs from the base input (dropout on the branch) and for sibling sites
that share one shrink ``x @ cat(A_q, A_k, A_v)^T`` and split it.

The two 2-D primitives they are built from are ops too (the backward formulas call them, so that the
backward graph traces under ``torch.compile`` as well), and can be used on their own::

    fxlora::lora_shrink(Tensor x, Tensor A, float scale) -> Tensor                           # scale * x @ A^T
    fxlora::lora_gemm(Tensor x, Tensor w, Tensor? bias, Tensor h, Tensor e, float scale) -> Tensor
        x @ w + bias + scale * h @ e

Backward (``dy`` flattened to ``T`` rows; ``ctx.needs_input_grad`` skips what is not needed, so a
frozen base costs neither ``dW`` nor ``db``)::

    dh = scale * dy @ B                 dB = scale * dy^T @ h        (h = x @ A^T is recomputed)
    dA = dh^T @ x                       dx = dy @ W + dh @ A          (one GEMM, rank-r term fused)
    dW = dy^T @ x                       db = dy.sum(0)
    lora_linear_h: dx = dy @ W, and dh is h's gradient.

Double backward works (every op in the backward is itself differentiable), through the composite
formulas.

Paths
-----
Each primitive runs one of three implementations, chosen per call from the tensors' device, dtype and
shape (:func:`choose_path`):

``"composite"``
    The textbook sequence (``mm``, ``mm``, ``mul``, ``add``), what autograd would run without the op.
``"addmm"``
    The fewest PyTorch kernels: ``t = h @ e`` (``addmm(bias, h, e, alpha=scale)`` with a bias), then
    ``t.addmm_(x, w, beta=scale)`` (``beta=1`` with a bias), so BLAS applies the scale and the add in
    its epilogue.  The default on CPU, for float32/float64, and on CUDA where Triton is not chosen.
``"triton"``
    :mod:`fxlora.triton_lora`: a skinny shrink kernel and one GEMM kernel that adds the rank-r term
    to its fp32 accumulator before the store, so the ``T x out`` branch output never goes to memory.
    CUDA float16/bfloat16 only (or CPU float16 under ``TRITON_INTERPRET=1``, for tests), ``r <= 128``,
    operands spanning fewer than ``2**31`` elements; other calls fall back to ``"addmm"``.

``"auto"`` (the default) picks ``"triton"`` for a call the kernels support that is on CUDA and has at
least :data:`TRITON_MIN_ROWS` rows, and for the GEMM also at most :data:`TRITON_MAX_K` reduction
columns; ``"addmm"`` otherwise.  Reasoning: fusing saves ``4·T·out`` bytes of traffic against the
GEMM's ``2·T·out·K`` flops, worth ~7-30% of the GEMM time on an H100/H200 for ``K`` in 1024-4096 and
less than the gap between a Triton GEMM and cuBLAS beyond that; with fewer rows the call is bound by
reading ``W`` and the fusion saves nothing.  The thresholds are provisional until
``python -m fxlora.tools.bench_ops`` has been run on the target GPU.

Force a path with :func:`set_path` / :func:`use_path`, or the environment variable
``FXLORA_OPS_PATH`` (``auto | composite | addmm | triton``), read at each call; the choice happens
inside the op at run time, so it applies to compiled and exported graphs too.  :data:`counters`
counts the calls per primitive and path (``"gemm.triton"``, ``"shrink.addmm"``, ...).

Numerical contract
------------------
Products accumulate in fp32 (fp64 for float64 inputs) on every path.  Let ``u`` be the unit roundoff
of the dtype (``2**-8`` bfloat16, ``2**-11`` float16, ``2**-24`` float32, ``2**-53`` float64) and
``|f|`` the op's formula evaluated on the absolute values of all inputs and ``|scale|``
(``|x||W|^T + |b| + |s|(|x||A|^T)|B|^T`` for ``lora_linear``).  Every output element satisfies::

    |y - y_exact| <= (c·u + K·u_acc) · |f|,    c = 2 ("triton"), 3 ("addmm"), 4 ("composite")

where ``K`` is the longest reduction and ``u_acc`` the accumulator's unit roundoff.  ``c`` counts
roundings: the Triton path rounds ``h`` and ``y`` (bias, scale and the rank-r term are applied in
fp32); ``"addmm"`` also rounds the materialised rank-r term; ``"composite"``, like the unfused
reference ``F.linear(x, W, b) + F.linear(F.linear(x, A), B) * scale``, also rounds the scaled term.
The ``K·u_acc`` term is the worst case; in practice it is ~``sqrt(K)·u_acc``, well below ``u`` for
half types.  Where the sum does not cancel (``|f| ≈ |y|``) this is one to two ulps of the output
dtype.  Gradients obey the same bound with their own formulas (``|f|`` is then the backward formula
on absolute values).  ``tests/test_ops.py`` checks it for every path.

Autocast: inside ``torch.autocast``, the ops cast their floating inputs (float64 excepted) to the
autocast dtype and run in it, as ``F.linear`` does; outside, all tensors must share one dtype.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import LoraOpError, TraceError

__all__ = [
    "lora_linear",
    "lora_linear_h",
    "lora_shrink",
    "lora_gemm",
    "PATHS",
    "PATH_ENV",
    "TRITON_MIN_ROWS",
    "TRITON_MAX_K",
    "counters",
    "set_path",
    "get_path",
    "use_path",
    "choose_path",
    "merge_pays",
    "lora_linear_eager",
    "lora_linear_h_eager",
    "LoraOpError",
]


#: The paths :func:`set_path` accepts.
PATHS = ("auto", "composite", "addmm", "triton")
#: Environment variable that forces a path when :func:`set_path` has not.
PATH_ENV = "FXLORA_OPS_PATH"
#: ``"auto"`` uses Triton only for calls with at least this many rows (tokens).
TRITON_MIN_ROWS = 64
#: ``"auto"`` uses the fused Triton GEMM only for reductions of at most this length.
TRITON_MAX_K = 4096

#: Calls per primitive and path, e.g. ``counters["gemm.triton"]``; clear it with ``counters.clear()``.
counters: collections.Counter = collections.Counter()

_HALF = (torch.float16, torch.bfloat16)
_TRITON_MAX_RANK = 128  # fxlora.triton_lora.MAX_RANK, without importing Triton
_INT32_LIMIT = 2**31
_forced: str | None = None


# --------------------------------------------------------------------------------------------------
# Path selection
# --------------------------------------------------------------------------------------------------


def _valid_path(path: str) -> str:
    if path not in PATHS:
        raise LoraOpError(f"unknown LoRA op path {path!r}: use one of {', '.join(PATHS)}")
    return path


def set_path(path: str | None) -> None:
    """Force every LoRA op call onto ``path`` (one of :data:`PATHS`); None restores the default
    (``$FXLORA_OPS_PATH``, else ``"auto"``)."""
    global _forced
    _forced = None if path is None else _valid_path(path)


def get_path() -> str:
    """The path in force: :func:`set_path`'s, else ``$FXLORA_OPS_PATH``'s, else ``"auto"``."""
    if _forced is not None:
        return _forced
    return _valid_path(os.environ.get(PATH_ENV) or "auto")


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
    """``with use_path("triton"): ...`` forces a path for the block, then restores the previous one."""
    global _forced
    before = _forced
    set_path(path)
    try:
        yield
    finally:
        _forced = before


@functools.lru_cache(maxsize=None)
def _triton_module():
    """:mod:`fxlora.triton_lora`, imported on first use, or None where Triton cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from . import triton_lora
    except ImportError:
        return None
    return triton_lora


def _triton_supports(x: Tensor, n: int, r: int) -> bool:
    """Whether the Triton kernels take an ``(M, K)`` input with ``n`` output columns and rank ``r``."""
    M, K = x.shape
    if x.dtype not in _HALF or not 1 <= r <= _TRITON_MAX_RANK or min(M, K, n) == 0:
        return False
    if max(M * K, M * n, K * n, M * r, K * r) >= _INT32_LIMIT:  # the kernels index in int32
        return False
    kernels = _triton_module()
    if kernels is None:
        return False
    if x.is_cuda:
        return True
    # CPU tensors run in Triton's interpreter, which lacks bfloat16 arithmetic (triton-lang/triton#11584).
    return x.device.type == "cpu" and kernels.interpreting() and x.dtype != torch.bfloat16


def choose_path(kernel: str, x: Tensor, n: int, r: int) -> str:
    """The implementation a primitive call runs: ``"composite"``, ``"addmm"`` or ``"triton"``.

    ``kernel`` is ``"shrink"`` (``x @ A^T``, ``n`` = ``r``) or ``"gemm"`` (``x @ w + h @ e`` with ``n``
    output columns); ``x`` is the 2-D ``(M, K)`` input.  See the module docstring for the rule.
    """
    path = get_path()
    if path in ("composite", "addmm"):
        return path
    if not _triton_supports(x, n, r):
        return "addmm"
    if path == "triton":
        return "triton"
    M, K = x.shape
    if not x.is_cuda or M < TRITON_MIN_ROWS:
        return "addmm"
    if kernel == "gemm" and K > TRITON_MAX_K:
        return "addmm"
    return "triton"


# --------------------------------------------------------------------------------------------------
# The two primitives, eagerly, on real tensors
# --------------------------------------------------------------------------------------------------


def _int32_indexable(*tensors: Tensor | None) -> bool:
    """Whether every element of these (strided) tensors lies within 2**31 elements of its start."""
    return all(
        t is None or 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) < _INT32_LIMIT
        for t in tensors
    )


def _shrink(x: Tensor, A: Tensor, scale: float) -> Tensor:
    """``scale * x @ A^T`` for 2-D ``x`` ``(M, K)`` and ``A`` ``(r, K)``, contiguous ``(M, r)``."""
    path = choose_path("shrink", x, A.shape[0], A.shape[0])
    if path == "triton" and not _int32_indexable(x, A):
        path = "addmm"
    counters["shrink." + path] += 1
    if path == "triton":
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return _triton_module().lora_shrink(x, A, scale)
    if path == "composite":
        return torch.mm(x, A.t()) * scale
    # BLAS applies alpha to the fp32 accumulator: one rounding; beta=0 ignores the empty tensor.
    h = x.new_empty((x.shape[0], A.shape[0]))
    return h.addmm_(x, A.t(), beta=0, alpha=scale)


def _gemm(x: Tensor, w: Tensor, bias: Tensor | None, h: Tensor, e: Tensor, scale: float) -> Tensor:
    """``x @ w + bias + scale * h @ e`` for 2-D ``x`` ``(M, K)``, ``w`` ``(K, N)``, ``h`` ``(M, r)``,
    ``e`` ``(r, N)``; a new contiguous ``(M, N)`` tensor."""
    path = choose_path("gemm", x, w.shape[1], h.shape[1])
    if path == "triton" and not _int32_indexable(x, w, bias, h, e):
        path = "addmm"
    counters["gemm." + path] += 1
    if path == "triton":
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return _triton_module().lora_gemm(x, w, bias, h, e, scale)
    if path == "composite":
        base = torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
        return base + torch.mm(h, e) * scale
    # addmm: the rank-r product first, then the base GEMM accumulates onto it in place; BLAS applies
    # bias, scale and the sum in its epilogues, so there is no elementwise kernel.
    if bias is not None:
        t = torch.addmm(bias, h, e, alpha=scale)
        return t.addmm_(x, w)
    t = torch.mm(h, e)
    return t.addmm_(x, w, beta=scale)


# --------------------------------------------------------------------------------------------------
# Checks shared by the real and fake kernels
# --------------------------------------------------------------------------------------------------


def _check(cond: bool, op: str, message: str) -> None:
    if not cond:
        raise LoraOpError(f"fxlora::{op}: {message}")


def _check_same(op: str, **tensors: Tensor | None) -> None:
    named = [(k, t) for k, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        same = t.dtype == first.dtype
        _check(same, op, f"{name} is {t.dtype} but {first_name} is {first.dtype}; cast them to one dtype")
        _check(t.device == first.device, op, f"{name} is on {t.device} but {first_name} is on {first.device}")
    _check(first.dtype.is_floating_point, op, f"expected floating-point tensors, got {first.dtype}")


def _check_linear(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, h_or_A: Tensor, B: Tensor) -> None:
    _check(x.dim() >= 1 and weight.dim() == 2 and B.dim() == 2, op, "x must be (..., in), weight (out, in), B (out, r)")
    out_f, in_f = weight.shape
    r = B.shape[1]
    _check(x.shape[-1] == in_f, op, f"x has {x.shape[-1]} features but weight is {tuple(weight.shape)} (out, in)")
    _check(B.shape[0] == out_f, op, f"B is {tuple(B.shape)} but must be (out, r) with out = {out_f}")
    _check(bias is None or tuple(bias.shape) == (out_f,), op, f"bias must be ({out_f},)")
    if op == "lora_linear":
        _check(tuple(h_or_A.shape) == (r, in_f), op, f"A is {tuple(h_or_A.shape)} but must be (r, in) = ({r}, {in_f})")
        _check_same(op, x=x, weight=weight, bias=bias, A=h_or_A, B=B)
    else:
        _check(
            tuple(h_or_A.shape) == (*x.shape[:-1], r),
            op,
            f"h is {tuple(h_or_A.shape)} but must be x's leading dims and r: {(*x.shape[:-1], r)}",
        )
        _check_same(op, x=x, weight=weight, bias=bias, h=h_or_A, B=B)


def _check_gemm(x: Tensor, w: Tensor, bias: Tensor | None, h: Tensor, e: Tensor) -> None:
    op = "lora_gemm"
    _check(all(t.dim() == 2 for t in (x, w, h, e)), op, "x, w, h, e must be 2-D")
    _check(w.shape[0] == x.shape[1] and h.shape[0] == x.shape[0], op, "x (M, K), w (K, N), h (M, r) do not fit")
    _check(e.shape[0] == h.shape[1] and e.shape[1] == w.shape[1], op, "e must be (r, N)")
    _check(bias is None or tuple(bias.shape) == (w.shape[1],), op, "bias must be (N,)")
    _check_same(op, x=x, w=w, bias=bias, h=h, e=e)


def _check_shrink(x: Tensor, A: Tensor) -> None:
    _check(x.dim() == 2 and A.dim() == 2 and x.shape[1] == A.shape[1], "lora_shrink", "x must be (M, K), A (r, K)")
    _check_same("lora_shrink", x=x, A=A)


# --------------------------------------------------------------------------------------------------
# fxlora::lora_shrink and fxlora::lora_gemm
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fxlora::lora_shrink", mutates_args=(), schema="(Tensor x, Tensor A, float scale) -> Tensor")
def lora_shrink(x: Tensor, A: Tensor, scale: float) -> Tensor:
    """``scale * x @ A^T``: ``x`` ``(M, K)``, ``A`` ``(r, K)`` -> ``(M, r)``."""
    _check_shrink(x, A)
    return _shrink(x, A, scale)


@lora_shrink.register_fake
def _(x, A, scale):
    _check_shrink(x, A)
    return x.new_empty((x.shape[0], A.shape[0]))


def _shrink_setup(ctx, inputs, output):
    x, A, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, A)


def _shrink_backward(ctx, dh):
    x, A = ctx.saved_tensors
    s = ctx.scale
    dx = torch.mm(dh, A) * s if ctx.needs_input_grad[0] else None
    dA = torch.mm(dh.t(), x) * s if ctx.needs_input_grad[1] else None
    return dx, dA, None


lora_shrink.register_autograd(_shrink_backward, setup_context=_shrink_setup)


@torch.library.custom_op(
    "fxlora::lora_gemm",
    mutates_args=(),
    schema="(Tensor x, Tensor w, Tensor? bias, Tensor h, Tensor e, float scale) -> Tensor",
)
def lora_gemm(x: Tensor, w: Tensor, bias: Tensor | None, h: Tensor, e: Tensor, scale: float) -> Tensor:
    """``x @ w + bias + scale * h @ e``: ``x`` ``(M, K)``, ``w`` ``(K, N)``, ``h`` ``(M, r)``, ``e`` ``(r, N)``."""
    _check_gemm(x, w, bias, h, e)
    return _gemm(x, w, bias, h, e, scale)


@lora_gemm.register_fake
def _(x, w, bias, h, e, scale):
    _check_gemm(x, w, bias, h, e)
    return x.new_empty((x.shape[0], w.shape[1]))


def _gemm_setup(ctx, inputs, output):
    x, w, bias, h, e, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, w, h, e)


def _gemm_backward(ctx, dy):
    x, w, h, e = ctx.saved_tensors
    s = ctx.scale
    need_x, need_w, need_b, need_h, need_e = ctx.needs_input_grad[:5]
    dx = torch.mm(dy, w.t()) if need_x else None
    dw = torch.mm(x.t(), dy) if need_w else None
    db = dy.sum(0) if need_b else None
    dh = torch.mm(dy, e.t()) * s if need_h else None
    de = torch.mm(h.t(), dy) * s if need_e else None
    return dx, dw, db, dh, de, None


lora_gemm.register_autograd(_gemm_backward, setup_context=_gemm_setup)


# --------------------------------------------------------------------------------------------------
# fxlora::lora_linear
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "fxlora::lora_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale) -> Tensor",
)
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``F.linear(x, weight, bias) + scale * F.linear(F.linear(x, A), B)`` as one op (see the module
    docstring for shapes, paths and the error bound)."""
    _check_linear("lora_linear", x, weight, bias, A, B)
    return _base_plus_expand(x, weight, bias, _shrink(x.reshape(-1, x.shape[-1]), A, 1.0), B, scale)


def _base_plus_expand(x: Tensor, weight: Tensor, bias: Tensor | None, h2: Tensor, B: Tensor, scale: float) -> Tensor:
    """``F.linear(x, weight, bias) + scale * h2 @ B^T`` in one GEMM with epilogue, shaped like ``x``."""
    y = _gemm(x.reshape(-1, x.shape[-1]), weight.t(), bias, h2, B.t(), scale)
    return y.view(*x.shape[:-1], weight.shape[0])


def _linear_fake(name: str):
    """The fake (meta) kernel of the linear ops: the checks, and an output shaped like the base layer's."""

    def fake(x, weight, bias, a, b, scale):
        _check_linear(name, x, weight, bias, a, b)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return fake


lora_linear.register_fake(_linear_fake("lora_linear"))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, A, B, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, weight, A, B)


def _linear_backward(ctx, dy):
    x, weight, A, B = ctx.saved_tensors
    s = ctx.scale
    need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    out_f, in_f = weight.shape
    x2 = x.reshape(-1, in_f)
    dy2 = dy.reshape(-1, out_f)
    dx = dA = dB = None
    if need_x or need_A:
        dh = lora_shrink(dy2, B.t(), s)  # scale * dy @ B
        if need_A:
            dA = torch.mm(dh.t(), x2)
        if need_x:
            dx = lora_gemm(dy2, weight, None, dh, A, 1.0).view(x.shape)  # dy @ W + dh @ A
    if need_B:
        dB = torch.mm(dy2.t(), lora_shrink(x2, A, s))  # dy^T @ (scale * h), h recomputed
    dW, db = _base_grads(dy2, x2 if need_w else None, need_b)
    return dx, dW, db, dA, dB, None


def _base_grads(dy2: Tensor, x2: Tensor | None, need_b: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of the base layer's weight (when ``x2`` is given) and bias (when ``need_b``)."""
    return (None if x2 is None else torch.mm(dy2.t(), x2)), (dy2.sum(0) if need_b else None)


lora_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------------------------------------
# fxlora::lora_linear_h
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "fxlora::lora_linear_h",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor h, Tensor B, float scale) -> Tensor",
)
def lora_linear_h(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, B: Tensor, scale: float) -> Tensor:
    """``F.linear(x, weight, bias) + scale * F.linear(h, B)`` as one op, with ``h`` ``(..., r)`` computed
    by the caller (see the module docstring)."""
    _check_linear("lora_linear_h", x, weight, bias, h, B)
    return _base_plus_expand(x, weight, bias, h.reshape(-1, h.shape[-1]), B, scale)


lora_linear_h.register_fake(_linear_fake("lora_linear_h"))


def _linear_h_setup(ctx, inputs, output):
    x, weight, bias, h, B, scale = inputs
    ctx.scale = scale
    # x is only needed for dW: do not keep it alive for a frozen base.
    ctx.save_for_backward(x if weight.requires_grad else None, weight, h, B)


def _linear_h_backward(ctx, dy):
    x, weight, h, B = ctx.saved_tensors
    s = ctx.scale
    need_x, need_w, need_b, need_h, need_B = ctx.needs_input_grad[:5]
    out_f, in_f = weight.shape
    dy2 = dy.reshape(-1, out_f)
    dx = dh = dB = None
    if need_x:
        dx = torch.mm(dy2, weight).view(*dy.shape[:-1], in_f)
    if need_h:
        dh = lora_shrink(dy2, B.t(), s).view(h.shape)  # scale * dy @ B
    if need_B:
        dB = torch.mm(dy2.t(), h.reshape(-1, h.shape[-1])) * s
    dW, db = _base_grads(dy2, x.reshape(-1, in_f) if need_w else None, need_b)
    return dx, dW, db, dh, dB, None


lora_linear_h.register_autograd(_linear_h_backward, setup_context=_linear_h_setup)


# --------------------------------------------------------------------------------------------------
# Autocast: cast like F.linear, to the autocast dtype in force
# --------------------------------------------------------------------------------------------------

# torch.library.register_autocast casts to one fixed dtype; F.linear casts to the region's dtype
# (float16 or bfloat16), so the ops register their own kernel at the autocast keys, the way that
# function does.
_lib = torch.library.Library("fxlora", "FRAGMENT")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _autocast_kernel(op: torch._ops.OpOverload, device_type: str, key: str):
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(a):
        eligible = isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
        return a.to(torch.get_autocast_dtype(device_type)) if eligible and a.device.type == device_type else a

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op(*(cast(a) for a in args))

    return kernel


for _name in ("lora_linear", "lora_linear_h", "lora_shrink", "lora_gemm"):
    for _device_type, _key in _AUTOCAST_KEYS.items():
        _overload = getattr(torch.ops.fxlora, _name).default
        _lib.impl(_name, _autocast_kernel(_overload, _device_type, _key), _key, with_keyset=True)
del _name, _device_type, _key, _overload


# --------------------------------------------------------------------------------------------------
# Eager: what a lowered graph runs outside torch.compile and torch.export
# --------------------------------------------------------------------------------------------------
#
# A custom op costs its dispatch on every call (the op's Python wrapper, its autograd formula and
# checks: ~0.15-0.25 ms more host time per call than the plain ops on an H200 host, ops-h200.json), which
# is more than the kernels it saves.  Eagerly, a lowered graph calls these plain functions instead;
# ``torch.compile`` and ``torch.export`` see the ops.


def merge_pays(tokens: int, in_features: int, out_features: int) -> bool:
    """Whether ``F.linear(x, W + B_s A, b)`` moves fewer elements than the branch ``F.linear(x, W, b) +
    F.linear(F.linear(x, A), B_s)``: merging reads ``W`` and writes ``W + B_s A`` (``2*in*out``); the branch
    reads ``x`` again and writes, reads back and adds a full output (``T*(in + 4*out)``)."""
    return 2 * in_features * out_features < tokens * (in_features + 4 * out_features)


def lora_linear_eager(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """``fxlora::lora_linear``'s value, eagerly.  Where no gradient is recorded and :func:`merge_pays` for
    this call: the base GEMM over ``W + scale B A``, made per call (one ``addmm``); otherwise the branch's
    plain ops, the operators the graph runs.  Numerically the merged form rounds ``W + scale B A``
    once more than the base layer: within the op's bound with ``c = 2`` (module docstring).

    Where a gradient is recorded this is the branch's plain ops.  A merged forward with its own autograd
    formula (``dx`` through the merged weight made again, no ``dW``) moves less memory, but measured slower
    on an H200: Llama 1.2B b8 x s512, train step 92.6 ms against 84.9 ms for the plain ops (``python -m
    fxlora.tools.bench --compile none``, the rows "fxlora lowered" and "fxlora" at bbb1ef7:
    tools/results/bench-h200-merged-train.json).  That step is bound by the host, where the formula's
    Python costs more than the memory traffic it saves."""
    if _plain_ops_only(x, weight, bias, A, B):
        # the graph's operators in the graph's order (base GEMM first), so that autograd sums x's gradient
        # contributions in the graph's order too: the same gradients, bit for bit
        _count("linear.branch")
        base = F.linear(x, weight, bias)
        h = F.linear(x, A)
        return base + F.linear(h if scale == 1.0 else h * scale, B)
    tokens = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    if merge_pays(tokens, weight.shape[1], weight.shape[0]):
        _count("linear.merged")
        return F.linear(x, torch.addmm(weight, B, A, alpha=scale), bias)
    return _branch(x, weight, bias, F.linear(x, A), B, scale)


def lora_linear_dropout_eager(x: Tensor, weight: Tensor, bias: Tensor | None, dropped: Tensor, dropout: torch.nn.Module,
                              A: Tensor, B: Tensor, scale: float) -> Tensor:
    """A site with LoRA dropout, lowered for a forward that records no gradient: ``dropped`` is the output of
    its dropout, the ``nn.Dropout`` module ``dropout`` (called where the graph calls it, so that it draws its
    masks in the graph's order).  Where that dropout gave back its input (eval mode: :func:`_is_identity`),
    this is :func:`lora_linear_eager` over ``x`` (merged where that pays); otherwise the branch over
    ``dropped``."""
    if dropout.training and getattr(dropout, "inplace", False):
        # the dropout has overwritten x, which the graph's base GEMM read before it: x is gone
        raise LoraOpError(
            f"A LoRA dropout ({dropout!r}) was made in-place after the module was lowered: in train mode it overwrites "
            "the input the base layer reads. Set its inplace = False, or gm.lower_branches = False.")
    if _is_identity(dropout, dropped, x):
        return lora_linear_eager(x, weight, bias, A, B, scale)
    return _branch(x, weight, bias, F.linear(dropped, A), B, scale)  # (a module swapped in or hooked since: its output)


_module_hooks = torch.nn.modules.module


def _is_identity(dropout: torch.nn.Module, dropped: Tensor, x: Tensor) -> bool:
    """Whether ``dropout`` gave back ``x`` itself.  Eagerly that is what happened (``dropped is x``: an eval-mode
    dropout returns its input, whatever hooks, overrides or module swaps ran); Dynamo does not keep that
    identity, so under ``torch.compile`` it is read from the module: an ``nn.Dropout`` in eval mode, with no
    forward of its own and no hook (its own or global)."""
    if not torch.compiler.is_compiling():
        return dropped is x
    return (not dropout.training and type(dropout) is torch.nn.Dropout and "forward" not in dropout.__dict__
            and not (dropout._forward_hooks or dropout._forward_pre_hooks)
            and not (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks))


def lora_linear_h_eager(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, B: Tensor, scale: float) -> Tensor:
    """``fxlora::lora_linear_h``'s value, eagerly: the branch's plain ops (a branch whose input is not
    ``x A^T`` cannot be merged), the operators the graph runs."""
    return _branch(x, weight, bias, h, B, scale)


_peek_transform = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)


def _plain_ops_only(*tensors: Tensor | None) -> bool:
    """Whether a call must run the graph's own ops: gradients are recorded (autograd sees what the graph
    would record; also where none of these tensors requires one, as in a frozen module called in a train
    step, so that the call computes what the graph does), autocast is on (the ops cast as ``F.linear``
    does; a merged weight would be rounded in the autocast dtype), or a ``torch.func`` transform runs (its
    rules are the plain ops')."""
    if torch.is_grad_enabled():
        return True
    device = tensors[0].device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return True
    # Dynamo traces torch.func transforms itself (and answers the peek with an interpreter of its own)
    return not torch.compiler.is_compiling() and _peek_transform() is not None


def _count(path: str) -> None:
    """Count an eager call of a lowered linear site; not under ``torch.compile``, where the compiled graph runs
    no Python per call (Dynamo would guard on the counter's value and compile again at every call)."""
    if not torch.compiler.is_compiling():
        counters[path] += 1


def _branch(x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, B: Tensor, scale: float) -> Tensor:
    _count("linear.branch")
    expand = F.linear(h if scale == 1.0 else h * scale, B)  # as the graph scales it: on the rank-r input
    return F.linear(x, weight, bias) + expand


# --------------------------------------------------------------------------------------------------
# Eager: the host cost of the rest of a lowered graph
# --------------------------------------------------------------------------------------------------
#
# A captured graph calls every ATen op through its ``OpOverload`` (a Python ``__call__`` and a generic
# argument conversion), where a model's own code calls the op's Python binding.  A lowered graph runs
# eagerly only, so it calls the bindings: the same operators, found by PyTorch's argument parser.  Each
# entry takes the overload's arguments in its schema's order and names, except those BINDING_KEYWORDS
# moves to keywords; tests/test_eager_lowering.py runs each against its overload.

_aten = torch.ops.aten
_C_nn = torch._C._nn

#: ATen overload -> the Python binding a lowered graph calls instead
BINDINGS: dict = {
    _aten.linear.default: _C_nn.linear,
    _aten.addmm.default: torch.addmm,
    _aten.matmul.default: torch.matmul,
    _aten.mm.default: torch.mm,
    _aten.bmm.default: torch.bmm,
    _aten.add.Tensor: torch.add,
    _aten.sub.Tensor: torch.sub,
    _aten.mul.Tensor: torch.mul,
    _aten.div.Tensor: torch.div,
    _aten.neg.default: torch.neg,
    _aten.rsqrt.default: torch.rsqrt,
    _aten.sqrt.default: torch.sqrt,
    _aten.pow.Tensor_Scalar: torch.pow,
    _aten.mean.dim: torch.mean,
    _aten.exp.default: torch.exp,
    _aten.cos.default: torch.cos,
    _aten.sin.default: torch.sin,
    _aten.tanh.default: torch.tanh,
    _aten.sigmoid.default: torch.sigmoid,
    _aten.silu.default: _C_nn.silu,
    _aten.gelu.default: _C_nn.gelu,
    _aten.softmax.int: torch.softmax,
    _aten.layer_norm.default: torch.layer_norm,
    _aten.embedding.default: torch.embedding,
    _aten.dropout.default: torch.dropout,
    _aten.scaled_dot_product_attention.default: _C_nn.scaled_dot_product_attention,
    _aten.view.default: torch.Tensor.view,
    _aten.reshape.default: torch.reshape,
    _aten.transpose.int: torch.transpose,
    _aten.permute.default: torch.permute,
    _aten.unsqueeze.default: torch.unsqueeze,
    _aten.select.int: torch.select,
    _aten.cat.default: torch.cat,
    _aten.to.dtype: torch.Tensor.to,
}


def check_tensor_metadata(a: Tensor, size: Any = None, stride: Any = None, dtype: torch.dtype | None = None, *,
                          device: torch.device | None = None, layout: torch.layout | None = None) -> None:
    """``aten._assert_tensor_metadata`` (same signature) for a lowered graph: the sizes, strides, dtype,
    device and layout a ``torch.export`` capture recorded for a tensor its graph converts (``.to``); a plain
    Python check."""
    if ((dtype is None or a.dtype == dtype) and (device is None or a.device == device)
            and (layout is None or a.layout == layout) and (size is None or tuple(a.shape) == tuple(size))
            and (stride is None or a.stride() == tuple(stride))):
        return
    raise TraceError(
        f"this torch.export capture recorded a {dtype or a.dtype} tensor on {device or a.device} "
        f"(sizes {tuple(size) if size is not None else tuple(a.shape)}) where it now gets {a.dtype} on {a.device} "
        f"(sizes {tuple(a.shape)}): the capture fixes the dtypes and devices of the conversions in its graph. "
        "Convert the model (.to(dtype) / .to(device)) before capturing it, and capture it again.")


BINDINGS[_aten._assert_tensor_metadata.default] = check_tensor_metadata

#: binding -> {position in the overload's schema: keyword}: what the overload takes by position and the
#: binding only by keyword (``aten.to.dtype``'s ``memory_format``)
BINDING_KEYWORDS: dict = {torch.Tensor.to: {4: "memory_format"}}
