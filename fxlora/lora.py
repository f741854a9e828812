"""The LoRA math, in one place.

Every adapted site is described by a :class:`SiteSpec`.  For each kind of site (linear, embedding,
conv, conv_transpose, experts, tied) one class below says:

* ``shapes(spec)``: the shapes of ``lora_A`` and ``lora_B``;
* ``init_(A, B)``: their initialisation (loralib's conventions);
* ``shrink(x, A, spec)``: the rank-r projection of the branch input, ``A(x)``;
* ``expand(h, B, spec)``: from rank r to the base output, scale included, ``B(h) * alpha / r``;
* ``delta(A, B, spec)``: the same update as a weight-shaped tensor, which fold adds to the weight.

``shrink`` and ``expand`` are written with plain ``torch`` calls so that they run on tensors *and* on
``torch.fx.Proxy`` objects: the rewrite pass records them into the graph by calling them on proxies.
``expand(shrink(x)) == base_op(x, delta)`` is the invariant the tests check for every kind; nothing
outside this module knows how a kind's update is computed.

The math reads a spec's shapes and hyper-parameters, never its names (site, weight, bias, factors, dropout
module): the rewrite pass records the branch of a kind that is not ``per_call`` once per spec less its
names and replays the recorded ops at the other sites (:class:`fxlora.passes.rewrite_pass.Recordings`).

Two kinds depend on *how each call reads the weight* (``per_call = True``): MoE experts (a 3-D weight
indexed per expert before a matmul) and tied weights (one weight read by several uses, such as an
embedding lookup and an LM head).  Their ``shrink`` and ``expand`` take one more argument, a
:class:`Call` that the rewrite pass builds from the graph for each call (:func:`fxlora.sites.bind_call`):
the call's op with its weight operand replaced, the chain of views the call applies to its weight, or
which kind of use the call is.  The math stays here; the graph only says where the weight went.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from fxlora.errors import ArgumentError

__all__ = ["SiteSpec", "Call", "kind_of", "init_factors", "delta_weight", "merged_weight", "fold_fidelity", "update_survival", "DEFAULT_ADAPTER"]

#: The name of the adapter :func:`fxlora.rewrite` creates unless told otherwise.
DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class SiteSpec:
    """Everything the LoRA math and the passes need to know about one adapted site of one adapter.

    Recorded by the rewrite pass on the graph module (see :mod:`fxlora.provenance`) and on every node
    it creates, so that fold, the state-dict helpers and the report read it instead of parsing names.
    """

    name: str  # site qualified name, e.g. "encoder.layer.0.attention.self.query"
    kind: str  # "linear" | "embedding" | "conv" | "conv_transpose" | "experts" | "tied"
    weight: str  # qualified name of the base weight parameter
    bias: str | None  # qualified name of the base bias parameter, if any
    lora_A: str  # qualified names of the LoRA parameters
    lora_B: str
    dropout_module: str | None  # qualified name of the branch's nn.Dropout, if dropout > 0
    weight_shape: tuple[int, ...]
    in_features: int  # linear, experts: in; embedding: num_embeddings; conv(_transpose): in_channels; tied: columns
    out_features: int  # linear, experts: out; embedding: embedding_dim; conv(_transpose): out_channels; tied: rows
    r: int
    alpha: float
    dropout: float
    rule: str  # repr of the rule that selected this site
    rule_index: int
    enable_lora: tuple[bool, ...] | None = None
    fan_in_fan_out: bool = False
    op: dict[str, Any] = field(default_factory=dict)  # kind-specific base-op arguments
    rule_target: str = ""  # the selecting rule's target text (glob, "re:..." or type path)
    adapter: str = DEFAULT_ADAPTER

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class Call:
    """How one call of a ``per_call`` kind's site reads its weight, built by the rewrite pass from the graph.

    ``apply(x, operand)`` records the call's own op with ``x`` as its input and ``operand`` in place of
    the weight operand (any bias dropped); ``view(t)`` replays on ``t`` (a factor laid out like the
    weight) the views the call applies to its weight between the parameter and the op (an expert index,
    a transpose).  ``use`` (tied weights) says which kind of use the call is, and ``factors`` are the
    site's ``(A, B)``: a use that meets the weight's rows first reads ``B`` before ``A``.
    """

    apply: Callable[[Any, Any], Any] | None = None
    view: Callable[[Any], Any] | None = None
    use: Mapping[str, Any] | None = None
    factors: tuple[Any, Any] | None = None


class _Kind:
    name: str
    per_call: bool = False  # shrink/expand take a Call as a fourth argument

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    @staticmethod
    def init_(A: torch.Tensor, B: torch.Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def shrink(x: Any, A: Any, spec: SiteSpec) -> Any:
        raise NotImplementedError

    @staticmethod
    def expand(h: Any, B: Any, spec: SiteSpec) -> Any:
        raise NotImplementedError

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def add_delta_(cls, out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, spec: SiteSpec, coeff: float) -> None:
        """``out += coeff * delta(A, B)`` in place, ``out`` laid out like the weight."""
        out += cls.delta(A, B, spec) * coeff


def _kaiming_A_zero_B(A: torch.Tensor, B: torch.Tensor) -> None:
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    torch.nn.init.zeros_(B)


class LinearKind(_Kind):
    """``y = x W^T + b`` (or ``x W + b`` with ``fan_in_fan_out``), optionally a fused projection.

    With ``enable_lora`` (length n, k of them True) the output features are n equal slices of o
    features and only the k enabled ones are adapted, with loralib ``MergedLinear``'s shapes:
    ``lora_A`` is ``(r*k, in)``, ``lora_B`` is ``(o*k, r)``; slice g uses rows ``g*r:(g+1)*r`` of A and
    rows ``g*o:(g+1)*o`` of B.  The branch is a plain rank ``r*k`` branch whose B is block-structured:
    ``(out, r*k)``, block g of B in the enabled slice's rows and columns ``g*r:(g+1)*r``, zeros
    elsewhere.  That matrix is built from the parameters each forward (``out*r*k`` elements, a few
    kilobytes); no activation-sized zeros, slices or concatenations are ever made.
    """

    name = "linear"

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        mask = spec.enable_lora
        if mask is None:
            return (spec.r, spec.in_features), (spec.out_features, spec.r)
        k = sum(mask)
        return (spec.r * k, spec.in_features), (spec.out_features // len(mask) * k, spec.r)

    init_ = staticmethod(_kaiming_A_zero_B)

    @staticmethod
    def shrink(x: Any, A: Any, spec: SiteSpec) -> Any:
        return F.linear(x, A)

    @staticmethod
    def expand(h: Any, B: Any, spec: SiteSpec) -> Any:
        # the scale on the rank-r input, not on B: autograd then keeps B itself (the parameter) for the
        # backward, where a scaled copy of B would be one more tensor kept per site and step
        return F.linear(h * spec.scale, LinearKind.full_B(B, spec))

    @staticmethod
    def full_B(B: Any, spec: SiteSpec) -> Any:
        """``B`` as the ``(out, r*k)`` factor of a plain branch (``B`` itself without ``enable_lora``)."""
        mask = spec.enable_lora
        if mask is None or len(mask) == 1:
            return B
        n = len(mask)
        o = spec.out_features // n
        if sum(mask) == 1:  # one slice: B with zero rows above and below it, one op (its backward a slice)
            g = mask.index(True)
            return F.pad(B, (0, 0, g * o, (n - 1 - g) * o))
        # One block_diag: enabled slice g's block of B on its rows and rank columns; a disabled slice is an
        # empty (o, 0) block, which places o zero rows and no columns.
        blocks, g = [], 0
        for enabled in mask:
            if enabled:
                blocks.append(B[g * o : (g + 1) * o])
                g += 1
            else:
                blocks.append(B.new_empty((o, 0)))
        return torch.block_diag(*blocks)

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        d = (LinearKind.full_B(B, spec) @ A) * spec.scale
        return d.t() if spec.fan_in_fan_out else d

    @classmethod
    def add_delta_(cls, out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, spec: SiteSpec, coeff: float) -> None:
        """:meth:`delta` added by one ``addmm_`` (the scale its ``alpha``): one pass over ``out``, where
        ``out += delta * coeff`` makes and reads two weight-sized temporaries."""
        full_B = LinearKind.full_B(B, spec)
        if spec.fan_in_fan_out:
            out.addmm_(A.t(), full_B.t(), alpha=spec.scale * coeff)
        else:
            out.addmm_(full_B, A, alpha=spec.scale * coeff)


class EmbeddingKind(_Kind):
    """``y = W[idx]``; ``lora_A`` ``(r, num_embeddings)`` starts at zero, ``lora_B`` ``(dim, r)`` normal."""

    name = "embedding"

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (spec.r, spec.in_features), (spec.out_features, spec.r)

    @staticmethod
    def init_(A: torch.Tensor, B: torch.Tensor) -> None:
        torch.nn.init.zeros_(A)
        torch.nn.init.normal_(B)

    @staticmethod
    def shrink(x: Any, A: Any, spec: SiteSpec) -> Any:
        op = spec.op
        return F.embedding(
            x, A.t(), op.get("padding_idx"), None, 2.0, op.get("scale_grad_by_freq", False), op.get("sparse", False)
        )

    @staticmethod
    def expand(h: Any, B: Any, spec: SiteSpec) -> Any:
        return F.linear(h, B * spec.scale)

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        return ((B * spec.scale) @ A).t()


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvKind(_Kind):
    """``y = conv(x, W)``: a true low-rank branch, ``conv(x, A)`` with ``r`` output channels and the base
    kernel, stride, padding and dilation, then a 1x1 ``conv(., B)`` to the output channels.

    With ``groups = g > 1`` both convs are grouped, so each group of the base conv gets rank ``r / g``
    and the update stays block-diagonal like the base weight (``r`` must be divisible by ``g``).
    """

    name = "conv"

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        g = spec.op["groups"]
        kernel = spec.weight_shape[2:]
        return (spec.r, spec.in_features // g, *kernel), (spec.out_features, spec.r // g, *(1,) * len(kernel))

    init_ = staticmethod(_kaiming_A_zero_B)

    @staticmethod
    def shrink(x: Any, A: Any, spec: SiteSpec) -> Any:
        op = spec.op
        conv = _CONV[len(spec.weight_shape) - 2]
        padding = op["padding"]
        if op.get("padding_mode", "zeros") != "zeros":
            x = F.pad(x, op["reversed_padding"], mode=op["padding_mode"])
            padding = 0
        return conv(x, A, None, op["stride"], padding, op["dilation"], op["groups"])

    @staticmethod
    def expand(h: Any, B: Any, spec: SiteSpec) -> Any:
        conv = _CONV[len(spec.weight_shape) - 2]
        return conv(h, B * spec.scale, None, 1, 0, 1, spec.op["groups"])

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        g, r = spec.op["groups"], spec.r
        a = A.reshape(g, r // g, -1)  # (g, r/g, in/g * prod(kernel))
        b = B.reshape(g, spec.out_features // g, r // g) * spec.scale
        return (b @ a).reshape(spec.weight_shape)


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class ConvTransposeKind(_Kind):
    """``y = conv_transpose(x, W)`` with ``W`` of shape ``(in, out/g, *kernel)``: a true low-rank branch,
    ``conv_transpose(x, A)`` to ``r`` channels with the base's kernel, stride, padding, output_padding,
    dilation and groups, then a 1x1 ``conv(., B)`` to the output channels.

    ``A`` is ``(in, r/g, *kernel)``, ``B`` ``(out, r/g, 1, ...)``; with ``groups = g`` both are grouped, so
    each group gets rank ``r / g`` and the update is block-structured like ``W`` (it folds exactly):
    ``delta[g*in/g + i, o, k] = sum_j A[g*in/g + i, j, k] * B[g*out/g + o, j] * scale``.
    """

    name = "conv_transpose"

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        g = spec.op["groups"]
        kernel = spec.weight_shape[2:]
        return (spec.in_features, spec.r // g, *kernel), (spec.out_features, spec.r // g, *(1,) * len(kernel))

    init_ = staticmethod(_kaiming_A_zero_B)  # A initialised as nn.ConvTranspose initialises its own weight

    @staticmethod
    def shrink(x: Any, A: Any, spec: SiteSpec) -> Any:
        op = spec.op
        conv_t = _CONV_T[len(spec.weight_shape) - 2]
        return conv_t(x, A, None, op["stride"], op["padding"], op["output_padding"], op["groups"], op["dilation"])

    expand = staticmethod(ConvKind.expand)  # the same grouped 1x1 convolution to the output channels

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        g, r = spec.op["groups"], spec.r
        kernel = spec.weight_shape[2:]
        a = A.reshape(g, spec.in_features // g, r // g, -1)  # (g, in/g, r/g, prod(kernel))
        b = B.reshape(g, spec.out_features // g, r // g) * spec.scale  # (g, out/g, r/g)
        d = torch.einsum("gijk,goj->giok", a, b)  # (g, in/g, out/g, prod(kernel))
        return d.reshape(spec.in_features, spec.out_features // g, *kernel)


def _like_weight(factor: Any, spec: SiteSpec) -> Any:
    """An ``experts`` factor laid out like the weight: itself for ``(E, out, in)`` storage, its last two
    dims swapped for ``(E, in, out)`` (``fan_in_fan_out``)."""
    return factor.transpose(-2, -1) if spec.fan_in_fan_out else factor


class ExpertsKind(_Kind):
    """MoE experts stored as one 3-D weight ``(E, out, in)`` (or ``(E, in, out)`` with ``fan_in_fan_out``)
    and read per expert: ``F.linear(x, W[e])``, ``bmm(W[ids], x)``, ``grouped_mm(x, W.mT, offs)``,
    ``einsum``...  ``A`` is ``(E, r, in)``, ``B`` ``(E, out, r)`` (PEFT ``target_parameters``' per-expert
    factors), and the update of expert ``e`` is ``B[e] @ A[e] * scale``.

    The branch never builds an ``(E, out, in)`` update: it calls the *same op* the graph calls, once with
    ``A`` and once with ``B`` in place of the weight, each indexed exactly as the weight is (the same
    expert ids, offsets and views), so ``op(op(x, A'), B') == op(x, (B @ A)')`` for every op that is
    linear in the weight and keeps the input's layout (checked when the site is found).
    """

    name = "experts"
    per_call = True

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        e = spec.weight_shape[0]
        return (e, spec.r, spec.in_features), (e, spec.out_features, spec.r)

    @staticmethod
    def init_(A: torch.Tensor, B: torch.Tensor) -> None:
        # each expert's A as a Linear's (fan_in = in), as PEFT's (r*E, in) lora_A
        torch.nn.init.kaiming_uniform_(A.view(-1, A.shape[-1]), a=math.sqrt(5))
        torch.nn.init.zeros_(B)

    @staticmethod
    def shrink(x: Any, A: Any, spec: SiteSpec, call: Call) -> Any:
        return call.apply(x, call.view(_like_weight(A, spec)))

    @staticmethod
    def expand(h: Any, B: Any, spec: SiteSpec, call: Call) -> Any:
        return call.apply(h, call.view(_like_weight(B, spec))) * spec.scale

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        return _like_weight(torch.bmm(B, A) * spec.scale, spec)


class TiedKind(_Kind):
    """One 2-D weight ``W`` (rows, cols) read by several uses, such as a token embedding and the LM head
    that shares its weight: one pair for the *weight*, ``B`` (rows, r) and ``A`` (r, cols), and the same
    update ``B @ A * scale`` at every use, so that fold adds it once and the weights stay tied.

    Per use (``call.use``): a linear use ``F.linear(x, W)`` runs ``F.linear(F.linear(x, A), B * scale)``; a
    linear use reading ``W`` stored ``(in, out)`` (``x @ W``) runs ``x @ B @ A * scale``; an embedding use
    ``W[idx]`` runs ``B[idx] @ A * scale`` (``F.embedding`` on ``B``, with the use's padding_idx).  ``B``
    starts at zero; ``A`` is initialised as the first use's kind would initialise it: normal for an
    embedding (PEFT's tied embedding adapter), kaiming-uniform for a linear use.
    """

    name = "tied"
    per_call = True

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (spec.r, spec.in_features), (spec.out_features, spec.r)

    @staticmethod
    def init_(A: torch.Tensor, B: torch.Tensor, first_use: str = "linear") -> None:
        if first_use == "embedding":
            torch.nn.init.normal_(A)
        else:
            torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        torch.nn.init.zeros_(B)

    @staticmethod
    def shrink(x: Any, A: Any, spec: SiteSpec, call: Call) -> Any:
        use, (_, B) = call.use, call.factors
        if use["kind"] == "embedding":
            return F.embedding(x, B, use.get("padding_idx"), None, 2.0, use.get("scale_grad_by_freq", False), use.get("sparse", False))
        if use.get("fan_in_fan_out"):
            return F.linear(x, B.t())
        return F.linear(x, A)

    @staticmethod
    def expand(h: Any, B: Any, spec: SiteSpec, call: Call) -> Any:
        use, (A, _) = call.use, call.factors
        if use["kind"] == "embedding" or use.get("fan_in_fan_out"):
            return F.linear(h, A.t() * spec.scale)
        return F.linear(h, B * spec.scale)

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        return (B @ A) * spec.scale


_KINDS: dict[str, type[_Kind]] = {
    k.name: k for k in (LinearKind, EmbeddingKind, ConvKind, ConvTransposeKind, ExpertsKind, TiedKind)
}


#: the kinds of math a site can have (their names, as checkpoints record them)
KIND_NAMES = tuple(_KINDS)


def init_factors(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> None:
    """Initialise a new site's ``A`` and ``B`` in place, as its kind says."""
    if spec.kind == "tied":
        TiedKind.init_(A, B, spec.op.get("first_use", "linear"))
    else:
        kind_of(spec).init_(A, B)


def kind_of(spec: SiteSpec) -> type[_Kind]:
    """The class that holds ``spec``'s kind of math."""
    return _KINDS[spec.kind]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: updates are computed at least in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def delta_weight(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
    """The site's update ``delta(B, A) * scale`` in the base weight's layout, in float32 (float64 for
    float64 factors)."""
    ct = _compute_dtype(A, B)
    return kind_of(spec).delta(A.detach().to(ct), B.detach().to(ct), spec)


def merged_weight(
    W: torch.Tensor,
    updates: Iterable[tuple[torch.Tensor, torch.Tensor, SiteSpec, float]],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W + sum(coeff * delta(A, B))`` over ``updates`` (``(A, B, spec, coeff)`` each), computed in
    float32 (float64 when any input is float64) and rounded once to ``dtype`` (default ``W``'s dtype).
    Returns a new tensor; ``W`` and the factors are never written.
    """
    updates = list(updates)
    ct = _compute_dtype(W, *(t for a, b, _, _ in updates for t in (a, b)))
    out = W.detach().to(ct, copy=True)
    for A, B, spec, coeff in updates:
        kind_of(spec).add_delta_(out, A.detach().to(ct), B.detach().to(ct), spec, coeff)
    return out.to(W.dtype if dtype is None else dtype)


def fold_fidelity(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, spec: SiteSpec, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """How much of a site's update survives folding into a ``dtype`` weight.

    Returns ``(erased, rel_error)``: the fraction of the non-zero entries of the float32 reference
    update ``delta`` that rounding ``W + delta`` to ``dtype`` wipes out entirely (the merged weight
    equals the rounded base weight there), and ``|effective - delta|_F / |delta|_F``, where
    ``effective = round(W + delta) - round(W)`` is the update the folded model really applies.
    """
    dtype = W.dtype if dtype is None else dtype
    ref = delta_weight(A, B, spec)
    base = W.detach().to(dtype).float()
    effective = (W.detach().float() + ref).to(dtype).float() - base
    return update_survival(effective, ref)


def update_survival(effective: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(erased, rel_error)`` of an update ``effective`` that a folded model applies in place of the float32
    update ``ref``: the fraction of ``ref``'s non-zero entries where ``effective`` is zero, and
    ``|effective - ref|_F / |ref|_F`` (both 0 for a zero update)."""
    nonzero = ref != 0
    count = int(nonzero.sum())
    if count == 0:
        return 0.0, 0.0
    erased = float(((effective == 0) & nonzero).sum()) / count
    rel = float(torch.linalg.vector_norm(effective - ref) / torch.linalg.vector_norm(ref))
    return erased, rel


# --------------------------------------------------------------------------------------------- #
# Mixed batches: one sample, one adapter
# --------------------------------------------------------------------------------------------- #
#
# A served module (``fxlora.serve``) holds, per site, the factors of N adapters stacked along a leading
# dimension, plus one all-zero slot N for samples that run the base model alone:
#
#   A_stack   (N+1, R, in)        each adapter's A, zero-padded to the site's largest rank R
#   B_stack   (N+1, out, R)       each adapter's B (for enable_lora sites: the compact (o*k, r) blocks),
#                                 stored out-major so that all slots side by side are one (out, (N+1)*R) view
#   row_scale (N+1, R)            alpha/r on each adapter's own rank rows, 0 on the padding
#
# ``slots`` (one entry per sample) picks each sample's factors, with no loop over adapters, in one of two
# equivalent forms (see ``use_dense``):
#
#   gather  each sample's factors gathered by ``slots``, two batched matmuls over the samples; the extra
#           arithmetic is the rank-r products of one adapter.
#   dense   every row against every adapter's A in one GEMM, each row's products outside its own adapter
#           zeroed (and the rest scaled) by one multiply, and one GEMM against all B side by side; it
#           reads each stack once instead of copying a slot per sample, in as many kernels as a single
#           adapter's branch, at (N+1) times the rank-r arithmetic.
#
# The per-sample weights both forms multiply by (``mixed_weights``) depend only on ``slots`` and a
# site's ``row_scale``, so a served module computes them once per forward for all sites that share a
# ``row_scale``.  Scaling by ``row_scale`` also zeroes the padding, so padded rows and columns neither
# contribute nor receive gradients: training a mixed batch trains each sample's own adapter.
# Activations must be batch-major (rows of sample 0 first), as in Hugging Face models.

DENSE_ROWS = 64
"""Rows per sample times (N+1) up to which the dense form runs on every device (decoding over a few dozen
adapters): there, copying a slot of factors per sample costs more than reading every adapter's."""

DENSE_FLOPS = 0.5
"""On CUDA the dense form also runs when its extra arithmetic is at most this fraction of the base
matmul's, ``(N+1) R (in + out) <= DENSE_FLOPS * in * out``: the rank-r GEMMs are bound by memory and
launches, not FLOPs, and the dense form launches fewer kernels and copies no factors (on an H200, with 8
adapters at r=16, it took less time than the gather form in prefill on Llama 1B and GPT-2 Medium)."""


def use_dense(rows_per_sample: int, slot_count: int, rank: int, fan_in: int, fan_out: int, cuda: bool) -> bool:
    """Whether :func:`mixed_linear` takes the dense form (see ``DENSE_ROWS`` and ``DENSE_FLOPS``)."""
    if rows_per_sample * slot_count <= DENSE_ROWS:
        return True
    return cuda and slot_count * rank * (fan_in + fan_out) <= DENSE_FLOPS * fan_in * fan_out


def mixed_onehot(slots: torch.Tensor, slot_count: int, dtype: torch.dtype) -> torch.Tensor:
    """``(samples, slot_count)``: 1 at each sample's slot (computed once per forward, shared by the sites)."""
    return F.one_hot(slots, slot_count).to(dtype)


def mixed_weights(onehot: torch.Tensor, slots: torch.Tensor, row_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample weights of the sites whose ``row_scale`` is this one: ``(samples, 1, (N+1)*R)``, each
    sample's scale on its own slot's rank rows and 0 elsewhere (the dense form), and ``(samples, 1, R)``,
    its slot's scale rows (the gather form)."""
    samples = slots.shape[0]
    dense = (onehot.to(row_scale.dtype).unsqueeze(-1) * row_scale).reshape(samples, 1, -1)
    return dense, row_scale[slots].unsqueeze(1)


def _rows(x: torch.Tensor, slots: torch.Tensor, site: str, features: bool = True) -> int:
    """Rows per sample of ``x`` (..., features) (without ``features``: indices); an ArgumentError naming
    ``site`` when its rows do not split evenly over the samples."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() > 1 else x.numel()
    samples = slots.shape[0]
    if samples == 0 or rows % samples != 0:
        raise ArgumentError(
            f"adapter_ids has {samples} entries, but the input of site '{site}' has {rows} rows, which "
            "do not split evenly over the samples: give one adapter id per sample of the batch."
        )
    return (rows if features else x.numel()) // samples


def slice_blocks(B_stack: torch.Tensor, slices: torch.Tensor, *, out_major: bool) -> torch.Tensor:
    """Compact enable_lora factors ``(n1, k*o, r)`` placed on the output slices: slice i reads rank block g
    when ``slices[i, g]`` is 1 (a one-hot ``(n, k)`` placement), zeros elsewhere.  ``(n1, n*o, k*r)``, or
    with ``out_major`` the ``(n*o, n1*k*r)`` matrix of all slots side by side."""
    n1, ko, r = B_stack.shape
    n, k = slices.shape
    o = ko // k
    if out_major:
        return torch.einsum("ig,bgpq->ipbgq", slices, B_stack.reshape(n1, k, o, r)).reshape(n * o, n1 * k * r)
    return torch.einsum("ig,bgpq->bipgq", slices, B_stack.reshape(n1, k, o, r)).reshape(n1, n * o, k * r)


def _accumulate(base: torch.Tensor, h: torch.Tensor, B_t: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``base + h @ B_t`` as one GEMM that reads ``base`` as its accumulator (``h`` ``(..., k)``, ``B_t``
    ``(k, out)``, or batched: ``h`` ``(samples, rows, k)``, ``B_t`` ``(samples, k, out)``): no separate add
    kernel.  With ``in_place`` into ``base``, a site's output that this call is the one consumer of (a
    linear layer's result, or a view of its 2-D result that nothing else holds): no output-sized
    temporary either."""
    if B_t.dim() == 2 and base.dim() == 2 and h.dim() == 2:
        return base.addmm_(h, B_t) if in_place else torch.addmm(base, h, B_t)
    if B_t.dim() == 3:
        acc = base.reshape(h.shape[0], h.shape[1], -1)
        out = acc.baddbmm_(h, B_t) if in_place else torch.baddbmm(acc, h, B_t)
    else:
        acc, lhs = base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1])
        out = acc.addmm_(lhs, B_t) if in_place else torch.addmm(acc, lhs, B_t)
    return base if in_place and base.is_contiguous() else out.view(base.shape)


def mixed_linear(
    base: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor],
    A_stack: torch.Tensor, B_stack: torch.Tensor, slices: torch.Tensor | None = None, *, site: str = "?",
    add_in_place: bool = False,
) -> torch.Tensor:
    """``base`` plus each sample's linear branch ``(x_s A_s^T) * scale_s B_s^T``, in the dense or the
    gather form (see the comment above); ``weights`` from :func:`mixed_weights`.

    When no gradient is recorded and the dtypes agree (not under autocast's mixed dtypes), the products are
    scaled in place, and with ``add_in_place`` (``base`` is a fresh result that nothing but this call can
    see: a linear function's, not a module's, whose forward hooks may keep it) added in place into
    ``base``: the fewest kernels and Python calls per site, which is what bounds a served forward that the
    host cannot launch fast enough (small batches, decoding)."""
    per_sample = _rows(x, slots, site)
    samples = slots.shape[0]
    n1, R, fan_in = A_stack.shape
    fan_out = base.shape[-1]
    in_place = base.dtype == x.dtype == A_stack.dtype and not (
        torch.is_grad_enabled() and (base.requires_grad or x.requires_grad or A_stack.requires_grad)
    )
    if use_dense(per_sample, n1, R, fan_in, fan_out, x.is_cuda):
        h = F.linear(x, A_stack.view(n1 * R, fan_in))
        dense = weights[0]
        if h.dim() == 3 and h.shape[0] == samples:
            h = h.mul_(dense) if in_place else h * dense
        elif in_place:
            h.view(samples, -1, n1 * R).mul_(dense)  # h is F.linear's fresh, contiguous output
        else:
            h = (h.reshape(samples, -1, n1 * R) * dense).reshape(h.shape)
        # (n1*R, out): the out-major B stacks' slots side by side, a view
        B_t = B_stack.mT.flatten(0, 1) if slices is None else slice_blocks(B_stack, slices, out_major=True).T
        return _accumulate(base, h, B_t, add_in_place and in_place and h.dtype == base.dtype)
    rows = x.reshape(samples, per_sample, fan_in)
    h = torch.bmm(rows, A_stack[slots].mT)
    h = h.mul_(weights[1]) if in_place else h * weights[1]
    B = B_stack if slices is None else slice_blocks(B_stack, slices, out_major=False)
    return _accumulate(base, h, B[slots].mT, add_in_place and in_place and h.dtype == base.dtype)


def mixed_embedding(
    base: torch.Tensor, idx: torch.Tensor, slots: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor,
    row_scale: torch.Tensor, padding_idx: int | None = None, *, site: str = "?",
) -> torch.Tensor:
    """``base`` plus each sample's embedding branch ``A_s^T[idx] * scale_s B_s^T``."""
    rows = idx.reshape(slots.shape[0], _rows(idx, slots, site, features=False))
    h = A_stack.transpose(1, 2)[slots.unsqueeze(1), rows] * row_scale[slots].unsqueeze(1)
    if padding_idx is not None:  # as F.embedding: the padding row gets no gradient
        h = torch.where((rows == padding_idx).unsqueeze(-1), h.detach(), h)
    samples, per_sample = rows.shape
    return torch.baddbmm(base.reshape(samples, per_sample, -1), h, B_stack[slots].transpose(1, 2)).reshape(base.shape)
