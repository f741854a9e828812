"""Parameter budgets: which sites a set of rules adapts, and what it costs.

``fxlora.report(model, rules)`` prints the same plan the rewrite would apply (nothing is rewritten);
``fxlora.report(model)`` lists every candidate site so rules can be written; ``fxlora.report(gm)`` on a
rewritten module reports its sites and, with ``fidelity=dtype``, how much of each trained update
survives folding into ``dtype`` weights.  Works on ``meta``-device models: only shapes are read.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from tabulate import tabulate
from torch import nn
from torch.fx import GraphModule

from .errors import ArgumentError
from .lora import DEFAULT_ADAPTER, SiteSpec, fold_fidelity, kind_of
from .options import CaptureOptions, no_positional
from .pipeline import plan as make_plan
from .provenance import active_adapters, adapter_state, adapters_of, graph_sites, require_sites, require_unserved
from .quantized import dense, is_quantized, requantize_fidelity, stored_bytes
from .resolution import Plan
from .rules import Rule

__all__ = ["Report", "ReportRow", "report", "FORMATS"]

FORMATS = ("table", "markdown", "json", "csv")


@dataclass(frozen=True)
class ReportRow:
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    rule: str | None  # the selecting rule's target text
    r: int | None
    alpha: float | None
    enable_lora: tuple[bool, ...] | None
    base_params: int
    lora_params: int
    erased: float | None = None  # fidelity: fraction of the update rounding erases
    rel_error: float | None = None  # fidelity: relative error of the effective update
    shadowed: tuple[str, ...] = ()  # other rules that also selected the site, and lost to ``rule``
    rule_repr: str = ""  # the winning rule in full

    @property
    def rank_text(self) -> str:
        if self.r is None:
            return ""
        if self.enable_lora is None:
            return str(self.r)
        return f"{self.r} x {sum(self.enable_lora)} slices"

    @property
    def mask_text(self) -> str:
        if self.enable_lora is None:
            return ""
        return "".join("T" if b else "-" for b in self.enable_lora)


@dataclass
class Report:
    rows: list[ReportRow]
    base_params: int  # every parameter of the base model (tied ones once)
    model_bytes: int  # the base model's parameter bytes at its dtypes
    adapted: bool  # rules were given (or the module is rewritten)
    fidelity_dtype: torch.dtype | None = None
    fidelity_quantizer: str | None = None  # fidelity of re-quantizing with this function (fxlora.quantized)
    trained: dict[str, int] = field(default_factory=dict)  # modules trained in full (train_modules): parameters

    @property
    def lora_params(self) -> int:
        return sum(r.lora_params for r in self.rows)

    @property
    def trained_params(self) -> int:
        return sum(self.trained.values())

    @property
    def trainable_params(self) -> int:
        """LoRA factors plus the modules trained in full."""
        return self.lora_params + self.trained_params

    @property
    def trainable_percent(self) -> float:
        total = self.base_params + self.lora_params
        return 100.0 * self.trainable_params / total if total else 0.0

    @property
    def lora_bytes_fp32(self) -> int:
        return 4 * self.lora_params

    @property
    def lora_bytes_bf16(self) -> int:
        return 2 * self.lora_params

    def totals(self) -> dict[str, Any]:
        return {
            "sites": len(self.rows) if self.adapted else 0,
            "candidate_sites": len(self.rows),
            "base_params": self.base_params,
            "lora_params": self.lora_params,
            "trained_modules": dict(self.trained),
            "trainable_params": self.trainable_params,
            "trainable_percent": self.trainable_percent,
            "lora_bytes_fp32": self.lora_bytes_fp32,
            "lora_bytes_bf16": self.lora_bytes_bf16,
            "model_bytes": self.model_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            d = asdict(row)
            d["weight_shape"] = list(row.weight_shape)
            d["enable_lora"] = None if row.enable_lora is None else list(row.enable_lora)
            d["shadowed"] = list(row.shadowed)
            rows.append(d)
        return {
            "sites": rows,
            "totals": self.totals(),
            "fidelity_dtype": None if self.fidelity_dtype is None else str(self.fidelity_dtype),
            "fidelity_quantizer": self.fidelity_quantizer,
        }

    # -- rendering ------------------------------------------------------------------------------
    def _headers(self) -> list[str]:
        h = ["site", "kind", "weight", "rule", "r", "alpha", "enable_lora", "base params", "LoRA params"]
        if self.fidelity_dtype is not None:
            h += [f"erased in {_dtype_name(self.fidelity_dtype)}", "rel. error"]
        elif self.fidelity_quantizer is not None:
            h += [f"erased by {self.fidelity_quantizer}", "rel. error"]
        return h

    def _cells(self, row: ReportRow) -> list[Any]:
        cells = [
            row.name,
            row.kind,
            "x".join(map(str, row.weight_shape)),
            row.rule or "",
            row.rank_text,
            "" if row.alpha is None else _num(row.alpha),
            row.mask_text,
            f"{row.base_params:,}",
            f"{row.lora_params:,}",
        ]
        if self.fidelity_dtype is not None or self.fidelity_quantizer is not None:
            cells += [_pct(row.erased), _pct(row.rel_error)]
        return cells

    def summary_lines(self) -> list[str]:
        if not self.adapted:
            return [
                f"{len(self.rows)} candidate sites; base model: {self.base_params:,} parameters "
                f"({_bytes(self.model_bytes)}). Write rules to select sites."
            ]
        if self.trained:
            modules = ", ".join(f"{name} ({count:,})" for name, count in self.trained.items())
            return [
                f"sites: {len(self.rows)}   LoRA parameters: {self.lora_params:,}   trained in full: {modules}",
                f"trainable: {self.trainable_params:,} of {self.base_params + self.lora_params:,} "
                f"({self.trainable_percent:.4f}%)   checkpoint: {_bytes(4 * self.trainable_params)} (fp32), "
                f"{_bytes(2 * self.trainable_params)} (bf16)   full model: {_bytes(self.model_bytes)}",
            ]
        return [
            f"sites: {len(self.rows)}   LoRA parameters: {self.lora_params:,}   base parameters: {self.base_params:,}"
            f"   trainable: {self.trainable_percent:.4f}%",
            f"LoRA checkpoint: {_bytes(self.lora_bytes_fp32)} (fp32), {_bytes(self.lora_bytes_bf16)} (bf16)"
            f"   full model: {_bytes(self.model_bytes)}",
        ]

    def render(self, fmt: str = "table") -> str:
        if fmt not in FORMATS:
            raise ArgumentError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2)
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(self._headers())
            for row in self.rows:
                writer.writerow([c.replace(",", "") if i >= 7 and isinstance(c, str) else c for i, c in enumerate(self._cells(row))])
            return buf.getvalue()
        tablefmt = "github" if fmt == "markdown" else "simple"
        colalign = ["left"] * 7 + ["right"] * (len(self._headers()) - 7)
        table = tabulate([self._cells(r) for r in self.rows], headers=self._headers(), tablefmt=tablefmt, colalign=colalign)
        return table + "\n\n" + "\n".join(self.summary_lines() + self.shadow_lines())

    def shadow_lines(self) -> list[str]:
        """One line per site that several rules select: which rule won, which lost (the precedence is an
        exact name over a pattern over a type, then the rule listed first)."""
        return [
            f"note: '{row.name}' is also selected by {', '.join(row.shadowed)}, which lose to the rule "
            f"{row.rule_repr}"
            for row in self.rows
            if row.shadowed
        ]

    def __str__(self) -> str:
        return self.render("table")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _site_base_params(gm: GraphModule, spec_weight_shape: Sequence[int], bias: str | None) -> int:
    n = _numel(spec_weight_shape)
    if bias is not None:
        n += gm.get_parameter(bias).numel()
    return n


def _row(
    gm: GraphModule,
    spec: SiteSpec,
    lora_params: int,
    fidelity: tuple[float, float] | None,
    shadowed: tuple[Rule, ...] = (),
) -> ReportRow:
    return ReportRow(
        name=spec.name,
        kind=spec.kind,
        weight_shape=tuple(spec.weight_shape),
        rule=spec.rule_target,
        r=spec.r,
        alpha=spec.alpha,
        enable_lora=spec.enable_lora,
        base_params=_site_base_params(gm, spec.weight_shape, spec.bias),
        lora_params=lora_params,
        erased=None if fidelity is None else fidelity[0],
        rel_error=None if fidelity is None else fidelity[1],
        shadowed=tuple(map(repr, shadowed)),
        rule_repr=spec.rule,
    )


def _model_totals(module: nn.Module, exclude: set[str]) -> tuple[int, int]:
    params = [p for n, p in module.named_parameters() if n not in exclude]
    return sum(p.numel() for p in params), sum(stored_bytes(p) for p in params)


def report(
    model: nn.Module | Plan,
    rules: Rule | Sequence[Rule] | None = None,
    *positional: Any,
    fidelity: torch.dtype | Callable[[torch.Tensor], torch.Tensor] | None = None,
    adapter: str = DEFAULT_ADAPTER,
    train_modules: Sequence[str | type] | None = None,
    tied: str = "adapt",
    capture: CaptureOptions | str | None = None,
    **capture_kwargs: Any,
) -> Report:
    """The parameter budget of adapting ``model`` with ``rules`` (see the module docstring).

    ``model`` may be a model (captured and planned by :func:`fxlora.plan`, with the same ``adapter``,
    ``train_modules``, ``tied`` and capture options),
    a :class:`~fxlora.resolution.Plan`, or a module returned by :func:`fxlora.rewrite` (its sites, and
    with ``fidelity=dtype`` how much of each update survives folding into ``dtype`` weights; with
    ``fidelity=fn``, a quantizer such as ``torchao.quantization.to_nf4``, how much survives
    ``fold(gm, requantize=fn)`` at each site whose base weight is quantized, the other sites left blank).
    """
    no_positional(positional, "report")
    quantizer = fidelity if callable(fidelity) and not isinstance(fidelity, torch.dtype) else None
    if fidelity is not None and quantizer is None and not isinstance(fidelity, torch.dtype):
        raise ArgumentError(
            f"fidelity must be a torch.dtype or a quantizing function (fold's requantize), got {type(fidelity).__name__}."
        )
    rewritten = bool(graph_sites(model))
    if rewritten:
        require_unserved(model, "report")
        if rules is not None or train_modules or tied != "adapt" or capture is not None or capture_kwargs:
            raise ArgumentError(
                "this module is already rewritten: report it without rules, train_modules, tied or capture options "
                "(adapter= picks one of its adapters), or pass the base model."
            )
        if adapter != DEFAULT_ADAPTER and adapter not in adapters_of(model):
            raise ArgumentError(f"report: no adapter named {adapter!r}; this module has {', '.join(map(repr, adapters_of(model)))}.")
    names = [adapter] if rewritten and adapter in adapters_of(model) and adapter != DEFAULT_ADAPTER else (
        active_adapters(model) if rewritten else [])
    sites = {s.name: s for name in names for s in adapters_of(model)[name].values()} or graph_sites(model)
    if sites:
        lora = {n for s in sites.values() for n in (s.lora_A, s.lora_B)}
        rows = []
        for spec in sites.values():
            A, B = model.get_parameter(spec.lora_A), model.get_parameter(spec.lora_B)
            fid, W = None, model.get_parameter(spec.weight)
            if quantizer is not None:
                fid = requantize_fidelity(W, A, B, spec, quantizer) if is_quantized(W) else None
            elif fidelity is not None:
                fid = fold_fidelity(dense(W, f"the weight of site '{spec.name}'"), A, B, spec, fidelity)
            rows.append(_row(model, spec, A.numel() + B.numel(), fid))
        copies = [c for name in names for c in adapter_state(model).get("train_modules", {}).get(name, {}).items()]
        trained = {path: sum(p.numel() for p in model.get_submodule(copy).parameters()) for path, copy in copies}
        every_copy = {c for record in adapter_state(model).get("train_modules", {}).values() for c in record.values()}
        excluded = lora | {n for n, _ in model.named_parameters() if any(n.startswith(c + ".") for c in every_copy)}
        base, nbytes = _model_totals(model, excluded)
        return Report(
            rows, base, nbytes, adapted=True, trained=trained, fidelity_dtype=None if quantizer else fidelity,
            fidelity_quantizer=None if quantizer is None else getattr(quantizer, "__name__", "requantize"),
        )

    if fidelity is not None:  # fidelity needs trained LoRA weights: the module fxlora.rewrite returned
        require_sites(model, "report(..., fidelity=...)")
    if isinstance(model, Plan):
        if (rules is not None or capture is not None or capture_kwargs or train_modules or adapter != DEFAULT_ADAPTER
                or tied != "adapt"):
            raise ArgumentError(
                "report(plan) reports the plan as it is: give no rules, adapter, train_modules, tied or capture options."
            )
        the_plan = model
        base, nbytes = _model_totals(the_plan.graph_module, set())
    else:
        the_plan = make_plan(
            model, rules, adapter=adapter, train_modules=train_modules, tied=tied, capture=capture, **capture_kwargs
        )
        base, nbytes = _model_totals(model, set())
    gm = the_plan.graph_module
    if not the_plan.rules:
        rows = [
            ReportRow(
                name=c.name,
                kind=c.kind,  # type: ignore[arg-type]
                weight_shape=c.weight_shape,
                rule=None,
                r=None,
                alpha=None,
                enable_lora=None,
                base_params=_site_base_params(gm, c.weight_shape, c.bias),
                lora_params=0,
            )
            for c in the_plan.candidates
            if c.kind
        ]
        return Report(rows, base, nbytes, adapted=False)
    rows = []
    for site in the_plan.sites:
        shape_a, shape_b = kind_of(site.spec).shapes(site.spec)
        rows.append(_row(gm, site.spec, _numel(shape_a) + _numel(shape_b), None, site.shadowed))
    trained = {path: sum(p.numel() for p in gm.get_submodule(path).parameters()) for path in the_plan.train_modules}
    return Report(rows, base, nbytes, adapted=True, trained=trained)
