"""The LoRA math, in one place.

Every adapted site is described by a :class:`SiteSpec`.  For each kind of site (linear, embedding,
conv) one class below says:

* ``shapes(spec)``: the shapes of ``lora_A`` and ``lora_B``;
* ``init_(A, B)``: their initialisation (loralib's conventions);
* ``branch(x, A, B, spec)``: the side branch added to the base output, ``B(A(x)) * scale``, written
  with plain ``torch`` calls so it runs on tensors *and* on ``torch.fx.Proxy`` objects: the rewrite
  pass records it into the graph by calling it on proxies;
* ``delta(A, B, spec)``: the same update as a weight-shaped tensor, which the fold pass adds to the
  base weight.

``branch(x) == base_op(x, delta)`` is the invariant the tests check for every kind; nothing outside
this module knows how a kind's update is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["SiteSpec", "KINDS", "META_KEY", "kind_of", "delta_weight", "merged_weight", "graph_sites"]

#: The one ``node.meta`` key under which fxlora records provenance: ``{"site", "role", "spec"}``.
META_KEY = "fxlora"


@dataclass(frozen=True)
class SiteSpec:
    """Everything the LoRA math and the passes need to know about one adapted site.

    Stored under ``node.meta["fxlora"]["spec"]`` on every node the rewrite pass creates, so that fold,
    the state-dict helpers and the report read it from the graph instead of parsing names.
    """

    name: str  # site qualified name, e.g. "encoder.layer.0.attention.self.query"
    kind: str  # "linear" | "embedding" | "conv"
    weight: str  # qualified name of the base weight parameter
    bias: str | None  # qualified name of the base bias parameter, if any
    lora_A: str  # qualified names of the LoRA parameters
    lora_B: str
    dropout_module: str | None  # qualified name of the branch's nn.Dropout, if dropout > 0
    weight_shape: tuple[int, ...]
    in_features: int  # linear: in; embedding: num_embeddings; conv: in_channels
    out_features: int  # linear: out; embedding: embedding_dim; conv: out_channels
    r: int
    alpha: float
    dropout: float
    rule: str  # repr of the rule that selected this site
    rule_index: int
    enable_lora: tuple[bool, ...] | None = None
    fan_in_fan_out: bool = False
    op: dict[str, Any] = field(default_factory=dict)  # kind-specific base-op arguments
    rule_target: str = ""  # the selecting rule's target text (glob, "re:..." or type path)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def kind_impl(self) -> type[_Kind]:
        return KINDS[self.kind]


class _Kind:
    name: str

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    @staticmethod
    def init_(A: torch.Tensor, B: torch.Tensor) -> None:
        raise NotImplementedError

    @staticmethod
    def branch(x: Any, A: Any, B: Any, spec: SiteSpec) -> Any:
        raise NotImplementedError

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        raise NotImplementedError


class LinearKind(_Kind):
    """``y = x W^T + b`` (or ``x W + b`` with ``fan_in_fan_out``), optionally a fused projection.

    With ``enable_lora`` (length n, k of them True) the output features are n equal slices and only
    the k enabled ones are adapted, with shapes exactly as loralib's ``MergedLinear``: ``lora_A`` is
    ``(r*k, in)``, ``lora_B`` is ``(out/n*k, r)``; slice g uses rows ``g*r:(g+1)*r`` of A and rows
    ``g*out/n:(g+1)*out/n`` of B.  The branch never builds the ``out x in`` delta: one matmul with A,
    one batched matmul with the k blocks of B, and a concatenation that puts zeros in the disabled
    slices.
    """

    name = "linear"

    @staticmethod
    def shapes(spec: SiteSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        mask = spec.enable_lora
        if mask is None:
            return (spec.r, spec.in_features), (spec.out_features, spec.r)
        k = sum(mask)
        return (spec.r * k, spec.in_features), (spec.out_features // len(mask) * k, spec.r)

    @staticmethod
    def init_(A: torch.Tensor, B: torch.Tensor) -> None:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        torch.nn.init.zeros_(B)

    @staticmethod
    def branch(x: Any, A: Any, B: Any, spec: SiteSpec) -> Any:
        h = F.linear(x, A)
        mask = spec.enable_lora
        if mask is None:
            return F.linear(h, B) * spec.scale
        n, k, r = len(mask), sum(mask), spec.r
        o = spec.out_features // n
        # (..., k, r) x (k, o, r) -> (..., k, o): slice g of the output from block g of A and B.
        y = torch.einsum("...kr,kor->...ko", h.unflatten(-1, (k, r)), B.view(k, o, r))
        if k == n:
            return y.flatten(-2) * spec.scale
        zeros = torch.zeros_like(y.select(-2, 0))
        pieces, g = [], 0
        for enabled in mask:
            if enabled:
                pieces.append(y.select(-2, g))
                g += 1
            else:
                pieces.append(zeros)
        return torch.cat(pieces, -1) * spec.scale

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        mask = spec.enable_lora
        if mask is None:
            d = B @ A
        else:
            n, k, r = len(mask), sum(mask), spec.r
            o = spec.out_features // n
            blocks = B.view(k, o, r) @ A.view(k, r, spec.in_features)  # (k, o, in)
            d = blocks.new_zeros(n, o, spec.in_features)
            d[torch.tensor(mask, device=d.device)] = blocks
            d = d.view(spec.out_features, spec.in_features)
        d = d * spec.scale
        return d.t() if spec.fan_in_fan_out else d


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
    def branch(x: Any, A: Any, B: Any, spec: SiteSpec) -> Any:
        op = spec.op
        h = F.embedding(
            x, A.t(), op.get("padding_idx"), None, 2.0, op.get("scale_grad_by_freq", False), op.get("sparse", False)
        )
        return F.linear(h, B) * spec.scale

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        return (B @ A).t() * spec.scale


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

    @staticmethod
    def init_(A: torch.Tensor, B: torch.Tensor) -> None:
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        torch.nn.init.zeros_(B)

    @staticmethod
    def branch(x: Any, A: Any, B: Any, spec: SiteSpec) -> Any:
        op = spec.op
        conv = _CONV[len(spec.weight_shape) - 2]
        padding = op["padding"]
        if op.get("padding_mode", "zeros") != "zeros":
            x = F.pad(x, op["reversed_padding"], mode=op["padding_mode"])
            padding = 0
        h = conv(x, A, None, op["stride"], padding, op["dilation"], op["groups"])
        return conv(h, B, None, 1, 0, 1, op["groups"]) * spec.scale

    @staticmethod
    def delta(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
        g, r = spec.op["groups"], spec.r
        a = A.reshape(g, r // g, -1)  # (g, r/g, in/g * prod(kernel))
        b = B.reshape(g, spec.out_features // g, r // g)
        return (b @ a).reshape(spec.weight_shape) * spec.scale


KINDS: dict[str, type[_Kind]] = {k.name: k for k in (LinearKind, EmbeddingKind, ConvKind)}


def kind_of(spec: SiteSpec) -> type[_Kind]:
    return KINDS[spec.kind]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: updates are computed at least in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def delta_weight(A: torch.Tensor, B: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
    """The site's update ``delta(B, A) * scale`` in the base weight's layout, in float32 (float64 for
    float64 factors)."""
    ct = compute_dtype(A, B)
    return kind_of(spec).delta(A.detach().to(ct), B.detach().to(ct), spec)


def merged_weight(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, spec: SiteSpec, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``W + delta`` computed in float32 (float64 for float64 inputs) and rounded once to ``dtype``
    (default ``W``'s dtype).  Returns a new tensor; ``W``, ``A`` and ``B`` are never written.
    """
    ct = compute_dtype(W, A, B)
    d = delta_weight(A, B, spec).to(ct)
    return (W.detach().to(ct) + d).to(W.dtype if dtype is None else dtype)


def graph_sites(gm: torch.fx.GraphModule) -> dict[str, SiteSpec]:
    """The LoRA sites recorded in ``gm``'s graph, by site name, in graph order."""
    sites: dict[str, SiteSpec] = {}
    for node in gm.graph.nodes:
        info = node.meta.get(META_KEY)
        if info is not None:
            sites.setdefault(info["site"], info["spec"])
    return sites


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
    nonzero = ref != 0
    count = int(nonzero.sum())
    if count == 0:
        return 0.0, 0.0
    erased = float(((effective == 0) & nonzero).sum()) / count
    rel = float(torch.linalg.vector_norm(effective - ref) / torch.linalg.vector_norm(ref))
    return erased, rel
