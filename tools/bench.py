"""Benchmark: base, loralib, PEFT and fxlora side by side, on the same models with the same weights.

    python -m fxlora.tools.bench [--small] [--device cuda] [--out FILE.json] [--plot FILE.png]
                                 [--compile llama|gpt2|all|none] [--repeats 7] [--budget-s 240]

Configurations (transformers models built from configs, random weights, bf16 on a GPU):

* ``llama-1.2b`` b8 x s512: LlamaForCausalLM, hidden 2048, 16 layers, 32 heads, 8 kv heads,
  intermediate 8192, vocab 128256 (tied); r=16, alpha=32 on every linear layer of every block (q, k, v,
  o, gate, up, down; not the LM head, as PEFT's ``all-linear``).
* ``gpt2-medium`` b4 x s128 and b8 x s512: GPT2LMHeadModel 1024 wide, 24 layers; r=16, alpha=32 on the
  fused ``c_attn`` with ``enable_lora=[True, False, True]`` (fxlora; loralib's ``MergedLinear``), which
  is a rank-16 update of q and one of v.  PEFT has no per-slice mask: it adapts the whole ``c_attn`` at
  r=16 (one dense rank-16 update of q, k and v), noted in the results.

Implementations: ``base`` (the transformers model, frozen) and ``full FT`` (a copy of it, every
parameter trained); ``frozen base`` (a copy of the base with only its normalisation weights trained, all but
the first: a train step that computes the input gradient of every frozen linear layer a LoRA step needs and
nothing of an adapter, the floor the LoRA train steps are measured against); ``loralib`` (the same model with its layers swapped for loralib's, as loralib's
users do; skipped with a note where loralib is not installed); ``PEFT`` (``get_peft_model``);
``fxlora`` (``fxlora.rewrite``, captured with torch.export, running its graph: ``gm.lower_branches =
False``); ``fxlora lowered`` (the same rewrite with the eager lowering of docs/performance.md, fxlora's
default: forwards that record no gradient merge ``W + s B A`` per call where that pays, and train steps run
the graph's operators through their Python bindings; on CUDA by default, ``--lowered on|off``); ``fxlora
siblings`` (that rewrite with ``fuse_siblings=True``: q, k and v share one shrink GEMM, gate and up another, so
their forward without gradients does not merge; only on models with such branches, the Llama configuration;
``--no-siblings`` leaves it out).  Every implementation holds its LoRA
factors in the model's dtype (PEFT's default for bf16 models is float32 adapters, with the branch computed
in float32: ``--peft-adapter-dtype fp32`` measures that).  Every LoRA implementation gets non-zero
random factors, the same ones wherever the shapes agree (fxlora and loralib always; PEFT on Llama).

Before anything is timed, every implementation is checked against an independent float32 reference: a
float32 copy of the base model with a forward hook per site adding ``x @ (scale * B A)^T`` (the dense
update built from the implementation's own factors; for ``enable_lora`` the zero-padded slices):
logits, loss and the gradients of every LoRA factor (relative errors, tolerance per dtype); the folded
or merged model of each against the same reference; compiled variants against their eager selves.

Measured, medians of interleaved repeats (CUDA synchronised around every call):

* ``forward``: a forward of the batch under ``no_grad`` (LoRA unmerged), ratio to ``base``;
* ``train``: one train step (zero_grad, forward, next-token cross-entropy in float32, backward, AdamW
  step on the trainable parameters), ratio to ``full FT`` (the same step training every parameter);
* ``compiled forward`` / ``compiled train``: the same under ``torch.compile`` (default mode), ratios to
  the compiled base / compiled full FT; compiled for the models ``--compile`` names (default the Llama
  configuration), on the last (largest) shape of each or the shapes ``--compile-shapes`` names, the compile
  time reported; a variant whose compile fails is reported and left out;
* ``peak train memory``: the implementation's parameters, buffers and optimizer state plus the peak
  CUDA memory of a train step above what was allocated before it (what it would need alone);
* ``fold``: ``fxlora.fold(gm)``, PEFT's ``merge_and_unload()`` (on a fresh copy each time, the copy not
  timed) and loralib's merge (``module.eval()``; it merges in place, ``.train()`` unmerges untimed).

Writes JSON (``--out``, through ``fxlora.tools.results.write``), prints markdown tables, and draws a PNG bar
plot of the ratios (``--plot``; skipped with a note where matplotlib is not installed).  ``--small``: 2-layer
versions, float32 on CPU, compiled with the ``aot_eager`` backend (a smoke test of every code path; its
times mean little).  A row that fails is reported and the run goes on.  ``--budget-s`` (240 s by default on
a GPU) skips the optional sections that would not finish within it: a model, fold timing, and each compiled
pair (both compiles must fit: a ratio needs both; estimated from the compiles done so far); a row still running
``--grace-s`` (90 s) after the budget is interrupted and reported.  The JSON is written after every section
(``"partial": true`` until the run ends).  Exit status 1 if a check or a row failed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from fxlora.tools import results
from fxlora.tools.benchkit import (
    DTYPES,
    OUT_TOL,
    Budget,
    Errors,
    Log,
    allowed,
    build_model,
    finish,
    interleave,
    markdown,
    module_bytes,
    peak_bytes,
    ratio,
    rel_err,
    run_models,
    start,
    sync,
    timed,
    versions,
)
from torch import nn

import fxlora

R, ALPHA = 16, 32
LORA_IMPLS = ("loralib", "PEFT", "fxlora", "fxlora lowered", "fxlora siblings")
FLOOR = "frozen base"  # a train step with no adapter and the base frozen: the floor of every LoRA train step
LLAMA_SITES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


@dataclass
class Config:
    model: str
    shapes: list[tuple[int, int]]
    fx_rules: list[fxlora.Rule]
    peft_targets: list[str]
    fan_in_fan_out: bool
    note: str = ""


def configs(small: bool) -> list[Config]:
    return [
        Config("gpt2-medium", [(2, 8), (2, 16)] if small else [(4, 128), (8, 512)],
               [fxlora.Rule("transformer.h.*.attn.c_attn", r=R, alpha=ALPHA, enable_lora=[True, False, True])],
               ["c_attn"], True,
               note="fxlora and loralib adapt q and v of the fused c_attn (enable_lora=[True, False, True], r=16 each); "
                    "PEFT has no per-slice mask and adapts the whole c_attn at r=16"),
        Config("llama-1.2b", [(2, 16)] if small else [(8, 512)],
               [fxlora.Rule(f"model.layers.*.{s}", r=R, alpha=ALPHA) for s in LLAMA_SITES],
               [s.split(".")[1] for s in LLAMA_SITES], False,
               note="r=16 on every linear layer of every block (q, k, v, o, gate, up, down); not the LM head"),
    ]


@dataclass
class Site:
    """One adapted site of one implementation: its trainable factors and how to build its dense update."""

    A: nn.Parameter
    B: nn.Parameter
    scale: float
    mask: tuple[bool, ...] | None = None


@dataclass
class Impl:
    name: str
    module: nn.Module
    sites: dict[str, Site] = field(default_factory=dict)
    opt: torch.optim.Optimizer | None = None

    def __call__(self, ids: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        return (self.module if module is None else module)(input_ids=ids, use_cache=False).logits


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# --------------------------------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------------------------------


def random_factors(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]], seed: int, device) -> dict:
    """site -> (A, B) float32, ``A ~ N(0, 1/in)``, ``B ~ N(0, (0.1 / (scale sqrt r))^2)``: each site's update
    is ~10% of its input's scale."""
    out = {}
    for j, (site, (a_shape, b_shape, scale)) in enumerate(sorted(shapes.items())):
        g = torch.Generator(device).manual_seed(seed + j)
        a = torch.randn(a_shape, generator=g, device=device) / a_shape[1] ** 0.5
        b = torch.randn(b_shape, generator=g, device=device) * (0.1 / (scale * b_shape[1] ** 0.5))
        out[site] = (a, b)
    return out


@torch.no_grad()
def set_factors(impl: Impl, factors: dict) -> None:
    if set(factors) != set(impl.sites):
        raise RuntimeError(f"{impl.name}: sites differ from the factors' ({sorted(set(factors) ^ set(impl.sites))[:3]})")
    for site, (a, b) in factors.items():
        s = impl.sites[site]
        if s.A.shape != a.shape or s.B.shape != b.shape:
            raise RuntimeError(f"{impl.name} {site}: factors {tuple(s.A.shape)}, {tuple(s.B.shape)}; given "
                               f"{tuple(a.shape)}, {tuple(b.shape)}")
        s.A.copy_(a)
        s.B.copy_(b)


def make_fxlora(model: nn.Module, cfg: Config, example: torch.Tensor, lower: bool | str = False,
                siblings: bool = False) -> Impl:
    """``fxlora.rewrite`` of ``model`` (its own factors, the base weights shared); with ``lower``, the row
    "fxlora lowered": the same rewrite with ``gm.lower_branches = lower`` (the eager lowering); with ``siblings``
    too, the row "fxlora siblings": that rewrite with ``fuse_siblings=True`` (one shrink for the branches that
    read one input)."""
    # the example is a clone: with a view, torch.export's guards read ``input_ids._base`` on every call
    gm = fxlora.rewrite(model, cfg.fx_rules, example_inputs=(example.clone(),), example_kwargs={"use_cache": False},
                        fuse_siblings=siblings)
    gm.lower_branches = lower
    sites = {site: Site(gm.get_parameter(spec.lora_A), gm.get_parameter(spec.lora_B), spec.scale,
                        tuple(spec.enable_lora) if spec.enable_lora else None)
             for site, spec in fxlora.graph_sites(gm).items()}
    return Impl("fxlora siblings" if siblings else "fxlora lowered" if lower else "fxlora", gm.train(), sites)


def make_loralib(model: nn.Module, fx: Impl) -> Impl:
    """A copy of ``model`` with loralib's layers swapped in at fxlora's sites (loralib.Linear, or
    loralib.MergedLinear for enable_lora; ``fan_in_fan_out`` for GPT-2's Conv1D), sharing nothing."""
    import loralib
    from transformers.pytorch_utils import Conv1D

    lm = copy.deepcopy(model)
    sites = {}
    for name, site in fx.sites.items():
        owner_path, _, attr = name.rpartition(".")
        owner = lm.get_submodule(owner_path)
        old = getattr(owner, attr)
        fan_in_fan_out = isinstance(old, Conv1D)
        n_in, n_out = (old.weight.shape if fan_in_fan_out else old.weight.shape[::-1])
        kw = dict(r=R, lora_alpha=ALPHA, fan_in_fan_out=fan_in_fan_out, merge_weights=True,
                  device=old.weight.device, dtype=old.weight.dtype)
        if site.mask is not None:
            new = loralib.MergedLinear(n_in, n_out, enable_lora=list(site.mask), **kw)
        else:
            new = loralib.Linear(n_in, n_out, bias=old.bias is not None, **kw)
        new.weight = nn.Parameter(old.weight.detach(), requires_grad=False)  # the copy's own storage
        new.bias = None if old.bias is None else nn.Parameter(old.bias.detach(), requires_grad=False)
        setattr(owner, attr, new)
        sites[name] = Site(new.lora_A, new.lora_B, new.scaling, site.mask)
    loralib.mark_only_lora_as_trainable(lm)
    return Impl("loralib", lm.train(), sites)


def make_peft(model: nn.Module, cfg: Config, fp32_adapters: bool = False) -> Impl:
    """PEFT on a copy of ``model``; its adapters in the model's dtype like the others'
    (``autocast_adapter_dtype=False``), or in float32, PEFT's default for bf16/fp16 models."""
    import peft

    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=cfg.peft_targets,
                             fan_in_fan_out=cfg.fan_in_fan_out)
    pm = peft.get_peft_model(copy.deepcopy(model), config, autocast_adapter_dtype=fp32_adapters)
    sites = {name: Site(m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"])
             for name, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    return Impl("PEFT", pm.train(), sites)


def make_full_ft(model: nn.Module) -> Impl:
    ft = copy.deepcopy(model)
    for p in ft.parameters():
        p.requires_grad_(True)
    return Impl("full FT", ft.train())


def make_floor(model: nn.Module) -> Impl:
    """``frozen base``: a copy of ``model`` with every weight frozen but the normalisation layers' (all but the first
    in module order, the one below the first block's linear layers).  Its train step computes what every LoRA step
    must, the input gradient of each frozen linear layer above the first block's inputs, and no weight gradient
    of a linear layer, no branch: the floor of the LoRA rows (its norm weights' gradients and their AdamW step
    cost a few small reductions more)."""
    fl = copy.deepcopy(model)
    for p in fl.parameters():
        p.requires_grad_(False)
    norms = [m for m in fl.modules() if "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(False))]
    if not norms:
        raise RuntimeError("frozen base: the model has no normalisation layer with parameters")
    for m in norms[1:]:
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
    return Impl(FLOOR, fl.train())


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------------
# The independent float32 reference
# --------------------------------------------------------------------------------------------------


def dense_update(A: torch.Tensor, B: torch.Tensor, scale: float, mask: tuple[bool, ...] | None) -> torch.Tensor:
    """``scale * B A`` as an ``(out, in)`` matrix; with ``enable_lora``, block g of A and B makes the g-th
    enabled slice of the output and the disabled slices are zero."""
    if mask is None:
        return scale * (B @ A)
    k = sum(mask)
    r, o = A.shape[0] // k, B.shape[0] // k
    blocks, g = [], 0
    for enabled in mask:
        if enabled:
            blocks.append(B[g * o : (g + 1) * o] @ A[g * r : (g + 1) * r])
            g += 1
        else:
            blocks.append(A.new_zeros(o, A.shape[1]))
    return scale * torch.cat(blocks)


class Reference:
    """A float32 copy of the base model; ``run(ids, sites)`` adds each site's dense update with a hook."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).float().train()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def run(self, ids: torch.Tensor, sites: dict[str, Site] | None) -> dict[str, Any]:
        leaves = {name: (s.A.detach().float().clone().requires_grad_(), s.B.detach().float().clone().requires_grad_(),
                         s.scale, s.mask) for name, s in (sites or {}).items()}
        hooks = []
        for name, (A, B, scale, mask) in leaves.items():
            def hook(module, args, out, A=A, B=B, scale=scale, mask=mask):
                return out + F.linear(args[0], dense_update(A, B, scale, mask))
            hooks.append(self.model.get_submodule(name).register_forward_hook(hook))
        try:
            logits = self.model(input_ids=ids, use_cache=False).logits
            loss = lm_loss(logits, ids)
            grads = {}
            if leaves:
                flat = torch.autograd.grad(loss, [t for v in leaves.values() for t in v[:2]])
                grads = {name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(leaves)}
        finally:
            for h in hooks:
                h.remove()
        return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}


def check_impl(impl: Impl, ref: dict[str, Any], ids: torch.Tensor, tol: tuple[float, float]) -> dict[str, Any]:
    """Logits, loss and factor gradients of ``impl`` against the reference run with its factors, within
    ``tol`` (outputs, gradients)."""
    for p in impl.module.parameters():
        p.grad = None
    logits = impl(ids)
    loss = lm_loss(logits, ids)
    out: dict[str, Any] = {"logits": rel_err(logits, ref["logits"]), "loss": rel_err(loss, ref["loss"])}
    if impl.sites:
        loss.backward()
        num = den = 0.0
        worst = 0.0
        for name, s in impl.sites.items():
            for got, exp in zip((s.A.grad, s.B.grad), ref["grads"][name], strict=True):
                got = torch.zeros_like(exp) if got is None else got.float()
                num += float((got - exp).square().sum())
                den += float(exp.square().sum())
                worst = max(worst, rel_err(got, exp))
        out["grads"] = (num / max(den, 1e-30)) ** 0.5
        out["worst_site_grads"] = worst
        for p in impl.module.parameters():
            p.grad = None
    out["ok"] = out["logits"] <= tol[0] and out["loss"] <= tol[0] and out.get("grads", 0.0) <= tol[1]
    return out


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


def run_model(cfg: Config, a: argparse.Namespace, log: Log, errors: Errors, budget: Budget,
              checkpoint: Callable[[dict[str, Any]], None], res: dict[str, Any]) -> None:
    """Build, check and time every implementation on one model, into ``res`` (so that what was measured
    survives an exception); ``checkpoint(res)`` after each section writes what is known so far."""
    dev, dtype = a.device, DTYPES[a.dtype]
    res.update({"model": cfg.model, "note": cfg.note, "r": R, "alpha": ALPHA, "checks": {}, "shapes": {}, "notes": []})
    t0 = time.perf_counter()
    model = build_model(cfg.model, a.small, dev, dtype, layers=a.layers).train()
    for p in model.parameters():
        p.requires_grad_(False)
    vocab = model.config.vocab_size
    res["params"] = sum(p.numel() for p in model.parameters())
    log(f"{cfg.model}: {res['params'] / 1e6:.0f}M parameters, {a.dtype} on {dev} ({time.perf_counter() - t0:.1f} s)")
    g = torch.Generator(dev).manual_seed(1)
    check_ids = torch.randint(0, vocab, (2, a.check_len), generator=g, device=dev)

    impls: dict[str, Impl] = {"base": Impl("base", model)}
    t0 = time.perf_counter()
    fx = make_fxlora(model, cfg, check_ids)
    res["fxlora_capture_rewrite_s"] = time.perf_counter() - t0
    res["fxlora_custom_op_nodes"] = sum(1 for n in fx.module.graph.nodes
                                        if n.op == "call_function" and str(n.target).startswith("fxlora."))
    impls["fxlora"] = fx
    if a.lowered != "off":
        impls["fxlora lowered"] = make_fxlora(model, cfg, check_ids, lower=True if a.lowered == "on" else "auto")
    log(f"  fxlora: {len(fx.sites)} sites, captured and rewritten in {res['fxlora_capture_rewrite_s']:.1f} s "
        f"({res['fxlora_custom_op_nodes']} fxlora:: op nodes)")
    fx_shapes = {n: (tuple(s.A.shape), tuple(s.B.shape), s.scale) for n, s in fx.sites.items()}
    fx_factors = random_factors(fx_shapes, seed=100, device=dev)
    set_factors(fx, fx_factors)
    if "fxlora lowered" in impls:
        set_factors(impls["fxlora lowered"], fx_factors)
    if a.siblings and "fxlora lowered" in impls:  # the same with siblings sharing one shrink, where the model has any
        from fxlora.passes import counters

        before = counters["fuse_siblings"]["groups"]
        sib = make_fxlora(model, cfg, check_ids, lower=True if a.lowered == "on" else "auto", siblings=True)
        if counters["fuse_siblings"]["groups"] > before:
            set_factors(sib, fx_factors)
            impls["fxlora siblings"] = sib
        del sib
    try:
        import loralib  # noqa: F401
    except ImportError:
        res["notes"].append("loralib is not installed: its rows are skipped")
        log("  loralib is not installed: its rows are skipped")
    else:
        with errors.guard(f"{cfg.model}: build loralib"):
            impls["loralib"] = make_loralib(model, fx)
            set_factors(impls["loralib"], fx_factors)
    with errors.guard(f"{cfg.model}: build PEFT"):
        pm = make_peft(model, cfg, a.peft_adapter_dtype == "fp32")
        shapes = {n: (tuple(s.A.shape), tuple(s.B.shape), s.scale) for n, s in pm.sites.items()}
        set_factors(pm, fx_factors if shapes == fx_shapes else random_factors(shapes, seed=200, device=dev))
        res["peft_same_factors_as_fxlora"] = shapes == fx_shapes
        impls["PEFT"] = pm
    impls["full FT"] = make_full_ft(model)
    with errors.guard(f"{cfg.model}: build {FLOOR}"):
        impls[FLOOR] = make_floor(model)
    for impl in impls.values():
        if impl.name != "base":
            impl.opt = torch.optim.AdamW(trainable(impl.module), lr=1e-5)
    res["trainable_params"] = {k: sum(p.numel() for p in trainable(v.module)) for k, v in impls.items() if k != "base"}

    # ---- checks against the float32 reference (and each fold / merge)
    log("  checking every implementation against the float32 reference")
    tol = allowed(dtype)
    with errors.guard(f"{cfg.model}: reference checks"):
        ref = Reference(model)
        refs = {"base": ref.run(check_ids, None)}
        for name in LORA_IMPLS:
            if name in impls:
                refs[name] = ref.run(check_ids, impls[name].sites)
        # the base model's own error is the dtype's noise floor: the LoRA implementations may exceed it a little
        c = res["checks"]["base"] = check_impl(impls["base"], refs["base"], check_ids, tol)
        floor = c["logits"]
        c["ok"] = floor <= (OUT_TOL[dtype] if dtype == torch.float32 else 5 * OUT_TOL[dtype])  # a sanity bound
        tol = allowed(dtype, floor)
        effect = rel_err(refs["fxlora"]["logits"], refs["base"]["logits"])
        res["checks"].update(noise_floor=floor, tolerance={"outputs": tol[0], "grads": tol[1]}, adapter_effect=effect)
        log(f"    base: logits {floor:.1e} from float32 (the noise floor); tolerance: outputs {tol[0]:.1e}, "
            f"factor grads {tol[1]:.1e}; the adapters change the reference logits by {effect:.1e}")
        if not c["ok"] or effect < 3 * tol[0]:
            errors.append({"row": f"{cfg.model}: check base", "error": f"noise floor {floor:.2e}, adapter effect {effect:.2e}"})
        if FLOOR in impls:  # the base model's copy: the base's outputs
            with errors.guard(f"{cfg.model}: check {FLOOR}"):
                c = res["checks"][FLOOR] = check_impl(impls[FLOOR], refs["base"], check_ids, tol)
                if not c["ok"]:
                    errors.append({"row": f"{cfg.model}: check {FLOOR}", "error": f"beyond tolerance: {c}"})
        for name in LORA_IMPLS:
            if name not in impls:
                continue
            with errors.guard(f"{cfg.model}: check {name}"):
                c = res["checks"][name] = check_impl(impls[name], refs[name], check_ids, tol)
                if name in ("fxlora lowered", "fxlora siblings"):  # merged where no gradient is recorded: its forward again, so
                    before = dict(fxlora.ops.counters)
                    with torch.no_grad():
                        c["lowered_logits"] = rel_err(impls[name](check_ids), refs[name]["logits"])
                    c["lowered_calls"] = {k: v - before.get(k, 0) for k, v in fxlora.ops.counters.items()
                                          if k.startswith("linear.") and v != before.get(k, 0)}
                    c["ok"] = c["ok"] and c["lowered_logits"] <= tol[0]
                log(f"    {name:<8} {'ok' if c['ok'] else 'FAILED'}: logits {c['logits']:.1e}, loss {c['loss']:.1e}, "
                    f"factor grads {c['grads']:.1e} (worst site {c['worst_site_grads']:.1e})")
                if not c["ok"]:
                    errors.append({"row": f"{cfg.model}: check {name}", "error": f"beyond tolerance: {c}"})
        with torch.no_grad():
            folds = {}
            with errors.guard(f"{cfg.model}: fold check fxlora"):
                folds["fxlora"] = rel_err(impls["fxlora"](check_ids, fxlora.fold(impls["fxlora"].module)),
                                          refs["fxlora"]["logits"])
            if "PEFT" in impls:
                with errors.guard(f"{cfg.model}: merge check PEFT"):
                    merged = copy.deepcopy(impls["PEFT"].module).merge_and_unload()
                    folds["PEFT"] = rel_err(merged(input_ids=check_ids, use_cache=False).logits, refs["PEFT"]["logits"])
                    del merged
            if "loralib" in impls:
                with errors.guard(f"{cfg.model}: merge check loralib"):
                    lm = impls["loralib"].module
                    lm.eval()  # loralib merges into the weights here
                    folds["loralib"] = rel_err(impls["loralib"](check_ids), refs["loralib"]["logits"])
                    lm.train()  # and unmerges
        for name, err in folds.items():
            res["checks"].setdefault(name, {})["folded_logits"] = err
            if err > tol[0]:
                res["checks"][name]["ok"] = False
                errors.append({"row": f"{cfg.model}: fold check {name}", "error": f"folded logits differ by {err:.2e}"})
        log("    folded / merged logits: " + ", ".join(f"{k} {v:.1e}" for k, v in folds.items()))
        del ref, refs
    gc.collect()
    checkpoint(res)

    # ---- eager timing, per shape
    for b, s in cfg.shapes:
        key = f"b{b} x s{s}"
        ids = torch.randint(0, vocab, (b, s), generator=g, device=dev)
        res["shapes"][key] = _time_shape(impls, ids, a, log, errors, f"{cfg.model} {key} ")
        checkpoint(res)

    # ---- fold timing
    if budget.allows(f"{cfg.model} fold timing", needs=10, notes=res["notes"]):
        res["fold_ms"] = _time_folds(impls, a, log, errors, cfg.model)
        checkpoint(res)

    # ---- compiled rows, on the shapes --compile-shapes names (the last, largest, by default)
    if cfg.model.split("-")[0] in a.compile or "all" in a.compile:
        chosen = {"last": cfg.shapes[-1:], "first": cfg.shapes[:1], "all": cfg.shapes}[a.compile_shapes]
        for b, s in chosen:
            ids = torch.randint(0, vocab, (b, s), generator=g, device=dev)
            label = cfg.model if len(cfg.shapes) == 1 else f"{cfg.model} b{b} x s{s}"
            _compiled(impls, ids, a, log, errors, budget, label, res, res["shapes"][f"b{b} x s{s}"], tol, checkpoint)
    for impl in impls.values():
        impl.opt = None


def _step(impl: Impl, ids: torch.Tensor, module: nn.Module | None = None) -> Callable[[], None]:
    def step():
        impl.opt.zero_grad(set_to_none=True)
        loss = lm_loss(impl(ids, module), ids)
        loss.backward()
        impl.opt.step()
    return step


def _forward(impl: Impl, ids: torch.Tensor, module: nn.Module | None = None) -> Callable[[], None]:
    def fwd():
        with torch.no_grad():
            impl(ids, module)
    return fwd


def _time_shape(impls: dict[str, Impl], ids, a, log, errors, label) -> dict[str, Any]:
    fns = {}
    for name in ("base", *LORA_IMPLS):
        if name in impls:
            fns[f"forward/{name}"] = _forward(impls[name], ids)
    for name in ("full FT", *LORA_IMPLS, FLOOR):
        if name in impls:
            fns[f"train/{name}"] = _step(impls[name], ids)
    log(f"  {label}: timing {len(fns)} rows x {a.repeats} interleaved repeats")
    ms = interleave(fns, a.repeats, a.device, errors, label=label)
    out: dict[str, Any] = {"forward_ms": {}, "train_ms": {}, "peak_train_bytes": {}, "train_step_peak_bytes": {}}
    for k, v in ms.items():
        kind, name = k.split("/")
        out[f"{kind}_ms"][name] = v
    for name in ("full FT", *LORA_IMPLS, FLOOR):
        if name in out["train_ms"]:
            with errors.guard(f"{label}peak memory {name}"):
                step_peak = peak_bytes(fns[f"train/{name}"], a.device)
                if step_peak is not None:
                    out["train_step_peak_bytes"][name] = step_peak
                    out["peak_train_bytes"][name] = step_peak + module_bytes(impls[name].module, optimizer=impls[name].opt)
    out["forward_ratio"] = {n: ratio(v, out["forward_ms"].get("base")) for n, v in out["forward_ms"].items() if n != "base"}
    out["train_ratio"] = {n: ratio(v, out["train_ms"].get("full FT")) for n, v in out["train_ms"].items() if n != "full FT"}
    log(f"  {label}: forward ms " + ", ".join(f"{k} {v:.2f}" for k, v in out["forward_ms"].items())
        + "; train ms " + ", ".join(f"{k} {v:.2f}" for k, v in out["train_ms"].items()))
    return out


def _time_folds(impls: dict[str, Impl], a, log, errors, label) -> dict[str, float]:
    """Fold / merge times (ms), interleaved rounds, one untimed warm-up each."""
    dev = a.device

    def fx_fold():
        fxlora.fold(impls["fxlora"].module)

    runs: dict[str, tuple[Callable[[], Any] | None, Callable[[], None]]] = {"fxlora": (None, fx_fold)}
    if "PEFT" in impls:
        box: dict[str, Any] = {}

        def peft_setup():
            box.clear()
            gc.collect()
            box["m"] = copy.deepcopy(impls["PEFT"].module)

        runs["PEFT"] = (peft_setup, lambda: box["m"].merge_and_unload())
    if "loralib" in impls:
        lm = impls["loralib"].module
        runs["loralib"] = (lambda: lm.train(), lambda: lm.eval())
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rnd in range(1 + a.fold_repeats):
        for name, (setup, fn) in list(runs.items()):
            with errors.guard(f"{label} fold {name}") as ok:
                if setup is not None:
                    setup()
                t = timed(fn, dev)
                if rnd:
                    times[name].append(t)
            if not ok["ok"]:
                runs.pop(name)
    if "loralib" in impls:
        impls["loralib"].module.train()  # unmerged again
    sync(dev)
    out = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items() if v}
    log(f"  {label}: fold / merge ms " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    return out


def _compiled(impls, ids, a, log, errors, budget, label, res, out, tol, checkpoint) -> None:
    """``torch.compile`` (default mode) in groups, by priority: the forward (with base) and train step (with full
    FT) of "fxlora lowered" (fxlora's default), then PEFT's, then those of "fxlora" (its graph).  Each variant is
    compiled and checked against its eager self (``tol``) while the budget lasts; each group is timed
    (interleaved) as soon as it is compiled, so that a run cut short keeps the groups done."""
    dev = a.device
    for k in ("compiled_forward_ms", "compiled_train_ms", "compile_s", "compiled_check", "compiled_peak_train_bytes",
              "compiled_forward_ratio", "compiled_train_ratio"):
        out.setdefault(k, {})
    groups = [(kind, (first, name)) for name in a.compile_impls
              for kind, first in (("forward", "base"), ("train", "full FT")) if not (name == FLOOR and kind == "forward")]
    wrappers: dict[str, nn.Module] = {}
    fns: dict[str, Callable[[], None]] = {}
    tried: set[str] = set()
    measured: dict[str, list[float]] = {"forward": [], "train": []}

    def estimate(kind: str) -> float:
        """Seconds one compile of ``kind`` may take: 1.3x the longest so far, a train step ~2.5x a forward."""
        if measured[kind]:
            return 1.3 * max(measured[kind])
        if kind == "train" and measured["forward"]:
            return 2.5 * 1.3 * max(measured["forward"])
        return {"forward": 20.0, "train": 40.0}[kind] if a.small else {"forward": 60.0, "train": 120.0}[kind]

    for kind, names in groups:
        if names[1] not in a.compile_impls or any(n not in impls for n in names):
            continue
        todo = [n for n in names if f"{kind}/{n}" not in tried]
        # a ratio needs both: start the pair only if both compiles fit in the budget
        if not budget.allows(f"{label} compiled {kind} of {' and '.join(todo)}", needs=estimate(kind) * len(todo),
                             notes=res["notes"]):
            continue
        for name in todo:
            key = f"{kind}/{name}"
            tried.add(key)
            impl = impls[name]
            with errors.guard(f"{label} compiled {kind} {name}"):
                if name not in wrappers:
                    wrappers[name] = torch.compile(impl.module, backend=a.compile_backend, dynamic=False)
                cm = wrappers[name]
                t0 = time.perf_counter()
                if kind == "forward":
                    with torch.no_grad():
                        got = impl(ids, cm)
                        sync(dev)
                        secs = time.perf_counter() - t0
                        err = rel_err(got, impl(ids))
                    del got
                else:
                    impl.opt.zero_grad(set_to_none=True)
                    loss = lm_loss(impl(ids, cm), ids)
                    loss.backward()
                    sync(dev)
                    secs = time.perf_counter() - t0
                    impl.opt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        err = rel_err(loss, lm_loss(impl(ids), ids))
                out["compile_s"][key] = secs
                out["compiled_check"][key] = err
                measured[kind].append(secs)
                log(f"  {label}: compiled {kind} {name} in {secs:.1f} s; vs eager {err:.1e}")
                if err > tol[0]:
                    raise RuntimeError(f"compiled {kind} of {name} differs from eager by {err:.2e} (tolerance {tol[0]:.1e})")
                fns[key] = _forward(impl, ids, cm) if kind == "forward" else _step(impl, ids, cm)
        group = {f"{kind}/{n}": fns[f"{kind}/{n}"] for n in names if f"{kind}/{n}" in fns}
        if len(group) < 2:
            continue
        ms = interleave(group, a.repeats, dev, errors, label=f"{label} compiled ")
        base_name, other = names
        if f"{kind}/{other}" in ms and f"{kind}/{base_name}" in ms:
            out[f"compiled_{kind}_ms"].setdefault(base_name, ms[f"{kind}/{base_name}"])
            out[f"compiled_{kind}_ms"][other] = ms[f"{kind}/{other}"]
            out[f"compiled_{kind}_ratio"][other] = ms[f"{kind}/{other}"] / ms[f"{kind}/{base_name}"]
            log(f"  {label}: compiled {kind} ms {base_name} {ms[f'{kind}/{base_name}']:.2f}, {other} "
                f"{ms[f'{kind}/{other}']:.2f}: ratio {out[f'compiled_{kind}_ratio'][other]:.3f}")
        if kind == "train":
            for name in names:
                if name in out["compiled_peak_train_bytes"] or f"train/{name}" not in ms:
                    continue
                with errors.guard(f"{label} compiled peak memory {name}"):
                    step_peak = peak_bytes(fns[f"train/{name}"], dev)
                    if step_peak is not None:
                        out["compiled_peak_train_bytes"][name] = step_peak + module_bytes(
                            impls[name].module, optimizer=impls[name].opt)
        checkpoint(res)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _gib(b: int | None) -> float | None:
    return None if b is None else b / 2**30


def _impls_of(res: dict[str, Any]) -> tuple[str, ...]:
    """The columns of a model's tables: its LoRA implementations (``fxlora lowered`` only where it ran), then the
    floor where it ran."""
    return tuple(n for n in (*LORA_IMPLS, FLOOR) if n in res.get("trainable_params", {}))


def tables(all_res: list[dict[str, Any]]) -> str:
    out = []
    for res in all_res:
        names = _impls_of(res)  # the columns of this model's tables
        for key, sh in res.get("shapes", {}).items():
            title = f"{res['model']}, {key}"
            rows = [
                ["unmerged forward / base", *(sh["forward_ratio"].get(n) for n in names)],
                ["train step / full fine-tuning", *(sh["train_ratio"].get(n) for n in names)],
            ]
            if sh.get("compiled_forward_ms") or sh.get("compiled_train_ms"):
                rows += [
                    ["torch.compile: forward / compiled base", *(sh.get("compiled_forward_ratio", {}).get(n) for n in names)],
                    ["torch.compile: train / compiled full FT", *(sh.get("compiled_train_ratio", {}).get(n) for n in names)],
                ]
            pk = sh["peak_train_bytes"]
            if pk:
                rows.append([f"peak train memory GiB (full FT {_gib(pk.get('full FT')) or 0:.2f})",
                             *(_gib(pk.get(n)) for n in names)])
            cpk = sh.get("compiled_peak_train_bytes")
            if cpk:
                rows.append([f"compiled: peak train memory GiB (full FT {_gib(cpk.get('full FT')) or 0:.2f})",
                             *(_gib(cpk.get(n)) for n in names)])
            if res.get("fold_ms") and key == next(iter(res["shapes"])):
                rows.append(["fold / merge ms", *(res["fold_ms"].get(n) for n in names)])
            out.append(f"\n### {title}\n")
            out.append(markdown([title, *names], rows))
            ms_rows = []
            for n in ("base", "full FT", *names):
                ms_rows.append([n, sh["forward_ms"].get(n), sh["train_ms"].get(n),
                                sh.get("compiled_forward_ms", {}).get(n), sh.get("compiled_train_ms", {}).get(n),
                                sh.get("compile_s", {}).get(f"forward/{n}"), sh.get("compile_s", {}).get(f"train/{n}")])
            out.append("\n" + markdown(["ms", "forward", "train step", "compiled forward", "compiled train step",
                                        "compile s (forward)", "compile s (train)"], ms_rows))
        out.append(f"\n{res['model']}: {res.get('note', '')}.")
        checks = res.get("checks", {})
        out.append("checks against the float32 reference (relative errors): " + "; ".join(
            f"{n} {'ok' if c.get('ok') else 'FAILED'} (logits {c.get('logits', float('nan')):.1e}"
            + (f", grads {c['grads']:.1e}" if "grads" in c else "")
            + (f", folded {c['folded_logits']:.1e}" if "folded_logits" in c else "") + ")"
            for n, c in ((n, checks[n]) for n in ("base", *names) if n in checks)))
        if "noise_floor" in checks:
            out.append(f"(base: the dtype's noise floor; tolerance outputs {checks['tolerance']['outputs']:.1e}, "
                       f"gradients {checks['tolerance']['grads']:.1e}; the adapters change the logits by "
                       f"{checks['adapter_effect']:.1e})")
    return "\n".join(out)


def plot(all_res: list[dict[str, Any]], path: str, log: Log, notes: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        msg = "matplotlib is not installed: no plot"
        log(msg)
        notes.append(msg)
        return
    panels = [(res["model"], key, sh, _impls_of(res)) for res in all_res for key, sh in res.get("shapes", {}).items()]
    measures = [("forward_ratio", "forward\n/ base"), ("train_ratio", "train\n/ full FT"),
                ("compiled_forward_ratio", "compiled fwd\n/ compiled base"),
                ("compiled_train_ratio", "compiled train\n/ compiled FT")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4), squeeze=False)
    for ax, (model, key, sh, names) in zip(axes[0], panels, strict=True):
        used = [(k, lbl) for k, lbl in measures if sh.get(k)]
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [sh[k].get(n) or 0.0 for k, _ in used]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(used))]
            bars = ax.bar(xs, vals, width, label=n)
            for bar, v in zip(bars, vals, strict=True):
                if v:
                    ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(used)), [lbl for _, lbl in used], fontsize=8)
        ax.set_title(f"{model}, {key}", fontsize=10)
        ax.set_ylabel("time ratio (lower is better)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="2-layer models, float32, CPU: a smoke test")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available, cpu with --small)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--models", default=",".join(c.model for c in configs(False)))
    p.add_argument("--compile", default="llama", help="models whose compiled rows run: llama, gpt2, all or none")
    p.add_argument("--compile-shapes", choices=("last", "first", "all"), default="last",
                   help="which of a model's shapes get the compiled rows: the last (largest; default), the first, or all")
    p.add_argument("--compile-backend", default=None, help="default inductor (aot_eager with --small)")
    p.add_argument("--compile-impls", default=f"fxlora lowered,{FLOOR},fxlora siblings,PEFT,fxlora",
                   help="implementations with compiled rows, by priority (the budget may cut the last), each timed "
                        "with the compiled base / full FT: 'fxlora lowered' (fxlora's default: torch.compile compiles "
                        f"the forward an eager call runs), '{FLOOR}' (train step only), PEFT, 'fxlora' (the graph itself)")
    p.add_argument("--lowered", choices=("auto", "on", "off"), default="auto",
                   help="the row 'fxlora lowered' (the same rewrite with gm.lower_branches set): 'auto' adds it on "
                        "CUDA with lower_branches='auto' (default), 'on' everywhere with lower_branches=True, "
                        "'off' leaves it out")
    p.add_argument("--siblings", action=argparse.BooleanOptionalAction, default=True,
                   help="the row 'fxlora siblings': 'fxlora lowered' rewritten with fuse_siblings=True (one shrink for "
                        "the branches that read one input), on the models that have such branches (default on)")
    p.add_argument("--repeats", type=int, default=None, help="default 7 (2 with --small)")
    p.add_argument("--fold-repeats", type=int, default=3)
    p.add_argument("--check-len", type=int, default=None, help="tokens per sample of the checks; default 64 (8 with --small)")
    p.add_argument("--peft-adapter-dtype", choices=("model", "fp32"), default="model",
                   help="PEFT's adapters in the model's dtype like loralib's and fxlora's (default; "
                        "autocast_adapter_dtype=False), or float32 (PEFT's default for bf16 models)")
    p.add_argument("--layers", type=int, default=None, help="override the models' depth (for quick tests)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip optional sections that would start after this many seconds (default 240; none with --small)")
    p.add_argument("--grace-s", type=float, default=90.0,
                   help="a row still running this long after the budget is interrupted, reported, and the run ends")
    p.add_argument("--out", metavar="FILE.json")
    p.add_argument("--plot", metavar="FILE.png")
    a = p.parse_args(argv)
    a.device = a.device or ("cpu" if a.small or not torch.cuda.is_available() else "cuda")
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    a.compile_backend = a.compile_backend or ("aot_eager" if a.small else "inductor")
    a.repeats = a.repeats or (2 if a.small else 7)
    if a.lowered == "auto" and not a.device.startswith("cuda"):
        a.lowered = "off"  # "auto" lowers CUDA float16/bfloat16 factors only: the row would be fxlora's again
    a.check_len = a.check_len or (8 if a.small else 64)
    a.compile = {c.strip() for c in a.compile.split(",")}
    a.compile_impls = [c.strip() for c in a.compile_impls.split(",") if c.strip()]
    for c in a.compile_impls:
        if c not in (*LORA_IMPLS, FLOOR):
            p.error(f"--compile-impls: unknown implementation {c!r}: use {', '.join((*LORA_IMPLS, FLOOR))}")
    if a.budget_s is None and not a.small:
        a.budget_s = 240.0
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available")
    wanted = [m.strip() for m in a.models.split(",") if m.strip()]
    by_name = {c.model: c for c in configs(a.small)}
    for m in wanted:
        if m not in by_name:
            p.error(f"unknown model {m!r}: use {', '.join(by_name)}")
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
        torch.backends.cudnn.allow_tf32 = False

    log, errors, budget, dev_name = start(a.device, a.budget_s, a.grace_s)
    log(f"bench on {dev_name}, {a.dtype}, compile backend {a.compile_backend}; {versions()}")
    notes: list[str] = []

    def payload(models: list[dict[str, Any]], text: str | None, partial: bool) -> dict[str, Any]:
        return {
            "benchmark": "bench", "small": a.small, "partial": partial, "device": dev_name, "dtype": a.dtype,
            "versions": versions(),
            "settings": {"repeats": a.repeats, "fold_repeats": a.fold_repeats, "compile": sorted(a.compile),
                         "compile_impls": a.compile_impls, "compile_shapes": a.compile_shapes,
                         "compile_backend": a.compile_backend, "check_len": a.check_len, "r": R, "alpha": ALPHA,
                         "budget_s": a.budget_s, "peft_adapter_dtype": a.peft_adapter_dtype},
            "models": models, "notes": notes, "errors": list(errors), "seconds": log.elapsed(), "markdown": text,
        }

    def write(models: list[dict[str, Any]], text: str | None, partial: bool) -> None:
        results.write(a.out, payload(models, text, partial), script=__file__, argv=argv)

    all_res = run_models(wanted, lambda m, res, checkpoint: run_model(by_name[m], a, log, errors, budget, checkpoint, res),
                         write, device=a.device, small=a.small, errors=errors, budget=budget, notes=notes)
    text = tables(all_res)
    print(text, flush=True)
    if a.plot:
        with errors.guard("plot"):
            plot(all_res, a.plot, log, notes)
    return finish(all_res, text, errors, write, log)


if __name__ == "__main__":
    raise SystemExit(main())
