""":func:`combine_adapters`: a new adapter made from existing ones, as PEFT's ``add_weighted_adapter``.

Given adapters with weights ``w_i`` (and their scales ``s_i = alpha_i / r_i``), the new adapter adapts
the union of their sites, with ``alpha = r`` (scale 1), and at each site:

``"linear"``
    ``A = sum(sign_i * sqrt(|w_i s_i|) * A_i)``, ``B = sum(sqrt(|w_i s_i|) * B_i)`` (all ranks at the site
    equal).  Cheap, but only an approximation of ``sum(w_i * delta_i)`` (the cross terms remain).
``"cat"``
    ``A = cat(w_i s_i A_i)``, ``B = cat(B_i)``: rank ``sum(r_i)``, exactly ``sum(w_i * delta_i)``.
``"svd"``
    the truncated SVD of ``sum(w_i * delta_i)`` at rank ``svd_rank`` (default: the largest rank at the
    site), optionally clamped at the ``svd_clamp`` quantile: ``B = U S``, ``A = V^T``.
``"ties"``, ``"dare_linear"``, ``"dare_ties"``
    as ``"linear"`` on the stacked A's and B's, with TIES (keep the ``density`` largest entries of each,
    elect a sign per entry by ``majority_sign_method``, average the agreeing ones) or DARE (keep each
    entry with probability ``density`` and rescale by ``1/density``; drawn from ``seed``, so
    reproducible; its expectation is the ``"linear"`` result), or both (``"dare_ties"``).

The arithmetic is PEFT's (``peft/utils/merge_utils.py``; the tests check it against
``add_weighted_adapter``), written here over fxlora's sites and :mod:`fxlora.lora`'s factor layouts, in
float32 (float64 for float64 factors) and stored in the factors' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from .errors import ArgumentError, RuleError
from .lora import SiteSpec, kind_of
from .named_adapters import check_not_split
from .passes import RewritePass
from .provenance import adapter_state, adapters_of, require_unserved
from .resolution import check_adapter_name, make_plan
from .rules import Rule

__all__ = ["combine_adapters", "METHODS"]

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def combine_adapters(
    gm: torch.fx.GraphModule,
    weights: Mapping[str, float],
    name: str,
    method: Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"] = "linear",
    *,
    density: float | None = None,
    seed: int | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
) -> None:
    """Add adapter ``name`` to ``gm``, made from the adapters in ``weights`` (name -> weight) by
    ``method`` (see the module docstring).  Like :func:`fxlora.add_adapter`, the new adapter is inactive
    until :func:`fxlora.set_adapter` selects it.  Nothing changes when any argument or site is refused."""
    require_unserved(gm, "combine_adapters")
    check_not_split(gm, "combine_adapters")
    known = adapters_of(gm)
    check_adapter_name(name)
    if name in known:
        raise ArgumentError(f"combine_adapters: this module already has an adapter named {name!r}.")
    if not isinstance(weights, Mapping) or not weights:
        raise ArgumentError("combine_adapters takes a non-empty dict of adapter name -> weight, e.g. {'a': 1.0, 'b': 0.5}.")
    for adapter, w in weights.items():
        if adapter not in known:
            raise ArgumentError(f"combine_adapters: no adapter named {adapter!r}; this module has {', '.join(map(repr, known))}.")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ArgumentError(f"combine_adapters: the weight of {adapter!r} must be a finite number, got {w!r}.")
    if method not in METHODS:
        raise ArgumentError(f"combine_adapters: method must be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    if len(weights) == 1:
        method = "linear"  # as PEFT: one adapter can only be scaled
    if method in ("ties", "dare_linear", "dare_ties"):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ArgumentError(f"combine_adapters(method={method!r}) needs density in (0, 1], got {density!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ArgumentError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ArgumentError(f"svd_rank must be a positive int, got {svd_rank!r}.")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 < svd_clamp <= 1):
        raise ArgumentError(f"svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}.")
    generator = torch.Generator().manual_seed(0 if seed is None else int(seed))

    sites: dict[str, list[tuple[SiteSpec, float]]] = {}
    for adapter, w in weights.items():
        for site, spec in known[adapter].items():
            sites.setdefault(site, []).append((spec, float(w)))

    # Compute every new factor pair first (refusing before any change), then add the adapter.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rules: list[Rule] = []
    for site, terms in sites.items():
        A, B, mask = _combine_site(gm, site, terms, method, density, generator, majority_sign_method, svd_rank, svd_clamp)
        first = terms[0][0]
        r = A.shape[0] // (sum(mask) if mask else 1)
        rules.append(Rule(site, r=r, alpha=r, dropout=first.dropout, enable_lora=mask,
                          fan_in_fan_out=first.fan_in_fan_out if first.kind == "linear" else None))
        factors[site] = (A, B)
    plan = make_plan(gm, rules, None, adapter=name, add_to_existing=True)
    for site in plan.sites:
        A, B = factors[site.name]
        shape_a, shape_b = kind_of(site.spec).shapes(site.spec)
        assert tuple(A.shape) == tuple(shape_a) and tuple(B.shape) == tuple(shape_b), (site.name, A.shape, shape_a)
    RewritePass(plan, activate=False)(gm)
    with torch.no_grad():
        for site in plan.sites:
            A, B = factors[site.name]
            gm.get_parameter(site.spec.lora_A).copy_(A)
            gm.get_parameter(site.spec.lora_B).copy_(B)
    state = adapter_state(gm)
    state["version"] = state.get("version", 0) + 1


def _refuse(site: str, method: str, why: str) -> RuleError:
    return RuleError(f"combine_adapters(method={method!r}) cannot combine site '{site}': {why}")


def _combine_site(gm, site, terms, method, density, generator, majority, svd_rank, svd_clamp):
    specs = [spec for spec, _ in terms]
    first = specs[0]
    As = [gm.get_parameter(s.lora_A).detach() for s in specs]
    Bs = [gm.get_parameter(s.lora_B).detach() for s in specs]
    dtype = As[0].dtype
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    As, Bs = [a.to(ct) for a in As], [b.to(ct) for b in Bs]
    if len({(s.kind, s.fan_in_fan_out, s.op.get("groups", 1)) for s in specs}) != 1:
        raise _refuse(site, method, "the adapters adapt it as different kinds of site")
    if method == "svd":
        return (*(t.to(dtype) for t in _svd(site, terms, As, Bs, svd_rank, svd_clamp, method)), None)
    masks = {s.enable_lora for s in specs}
    if len(masks) != 1:
        raise _refuse(site, method, f"the adapters use different enable_lora masks ({sorted(map(str, masks))}); use 'svd'")
    mask = first.enable_lora
    ws = [w * s.scale for s, w in terms]
    if method == "cat":
        k = sum(mask) if mask else 1
        groups = first.op.get("groups", 1) if first.kind == "conv" else 1
        blocks = k * groups  # the rank is split in k slices (enable_lora) or g groups (grouped conv)
        A = torch.cat([(a * w).reshape(blocks, a.shape[0] // blocks, *a.shape[1:]) for a, w in zip(As, ws)], 1)
        A = A.reshape(-1, *As[0].shape[1:])
        if first.kind == "conv":
            B = torch.cat(Bs, 1)  # (out, r_i / g, 1...) per group: concatenating keeps each group's block
        else:
            B = torch.cat([b.reshape(k, b.shape[0] // k, b.shape[1]) for b in Bs], 2).reshape(Bs[0].shape[0], -1)
        return A.to(dtype), B.to(dtype), mask
    if len({a.shape for a in As}) != 1:
        ranks = ", ".join(f"{s.adapter}: r={s.r}" for s in specs)
        raise _refuse(site, method, f"the adapters have different ranks there ({ranks}); use 'cat' or 'svd'")
    wa = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in ws], dtype=ct)
    wb = torch.tensor([math.sqrt(abs(w)) for w in ws], dtype=ct)
    A = _merge(As, wa, method, density, generator, majority)
    B = _merge(Bs, wb, method, density, generator, majority)
    return A.to(dtype), B.to(dtype), mask


def _delta_matrix(spec: SiteSpec, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The update as ``B' @ A'`` (rank <= r) in the (out, in) orientation the factors use."""
    if spec.kind == "conv":
        return B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1) * spec.scale
    B = kind_of(spec).full_B(B, spec) if spec.kind == "linear" else B
    return B @ A * spec.scale


def _svd(site, terms, As, Bs, svd_rank, svd_clamp, method):
    specs = [spec for spec, _ in terms]
    first = specs[0]
    if first.kind == "conv" and first.op.get("groups", 1) != 1:
        raise _refuse(site, method, "a grouped convolution's update is block-diagonal; its SVD does not keep that")
    delta = sum(w * _delta_matrix(spec, a, b) for (spec, w), a, b in zip(terms, As, Bs))
    rank = svd_rank or max(spec.r * (sum(spec.enable_lora) if spec.enable_lora else 1) for spec in specs)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.shape[0])
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    if first.kind == "conv":
        A = A.reshape(rank, *As[0].shape[1:])
        B = B.reshape(B.shape[0], rank, *Bs[0].shape[2:])
    return A, B


def _merge(tensors, weights, method, density, generator, majority):
    if method in ("ties", "dare_ties", "dare_linear"):
        tensors = [_prune(t, density, method, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("linear", "dare_linear"):
        return weighted.sum(0)
    sign_source = stacked.sum(0) if majority == "total" else stacked.sign().sum(0)  # PEFT: signs of the pruned tensors
    elected = torch.where(sign_source >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == elected
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _prune(t: torch.Tensor, density: float, method: str, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    if method == "ties":  # keep the density largest magnitudes
        k = int(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        keep[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
        return t * keep.reshape(t.shape)
    keep = torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype), generator=generator).to(t.device)
    return t * keep / density
