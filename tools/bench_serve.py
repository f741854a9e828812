"""Benchmark: one base model serving many adapters in one mixed batch (fxlora.serve) against a single
adapter, the base model, and PEFT's per-sample ``adapter_names=`` path; prefill and decode.

    python -m fxlora.tools.bench_serve [--small] [--device cuda] [--out FILE.json]
                                       [--models gpt2-medium,llama-1.2b] [--targets all|qv] [--profile]

Models (transformers, built from configs, random weights, the same weights for every row):
``gpt2-medium`` (GPT2LMHeadModel: 1024 wide, 24 layers, 16 heads) and ``llama-1.2b`` (LlamaForCausalLM:
hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 128256, tied embeddings), bf16 on
a GPU.  ``--small``: 2-layer versions of both, float32 on CPU, batch 8 over 4 adapters (a smoke test;
its times mean little).

Adapters: ``--adapters`` (8) adapters of rank ``--r`` (16, alpha 2r), with random non-zero factors, on
``--targets``: ``all`` (default) adapts every attention and MLP projection (GPT-2: ``attn.c_attn``,
``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``; Llama: ``q/k/v/o_proj``, ``gate/up/down_proj``); ``qv``
adapts q and v (Llama: ``q_proj``, ``v_proj``; GPT-2: its whole fused ``c_attn``, since PEFT has no
per-slice mask).  PEFT gets the same adapters with the same factors, in the model's dtype like fxlora's
(``--peft-adapter-dtype fp32`` keeps PEFT's default for bf16 models, float32 adapters).  The batch is ``--batch`` (32)
prompts of ``--prompt`` (128) tokens, sample i using adapter ``i % adapters``.

Checked before anything is timed (tolerance per dtype, relative Frobenius error per sample):
the served mixed batch equals each sample run alone with its adapter active; PEFT's mixed batch
(``adapter_names=``) equals fxlora's; the adapters change the output (so the check means something);
in decoding, the greedy tokens of the served decoder equal those of each sample decoded alone and those
of PEFT's ``generate(adapter_names=...)`` (a hard check in float32; in bf16 the agreement is reported,
since near-tied logits of a random model may round either way).

Rows (medians of interleaved repeats, CUDA synchronised around every call):

prefill forward of the whole batch (``use_cache=False``, full logits):
  ``fxlora mixed``      ``fxlora.serve(gm)(ids, adapter_ids=...)``: each sample its own adapter
  ``fxlora single``     ``gm(ids)`` with one adapter active (``set_adapter``), the same batch
                        (``gm.lower_branches``, the eager lowering: fxlora's default, ``"auto"``;
                        ``--lower-branches off|on``)
  ``base graph``        ``fxlora.unload(gm)``: the captured base graph, no adapter
  ``base HF``           the transformers model, eager
  ``PEFT single``       ``PeftModel`` with one adapter active
  ``PEFT mixed``        ``PeftModel(..., adapter_names=[...])``
  ``..., CUDA graph``   on CUDA, the three fxlora rows captured in a CUDA graph (``torch.cuda.graph``) and
                        replayed (checked against the eager call first): the device's time, with the
                        host's launching taken out.  An eager 128-token prefill of GPT-2 Medium is bound by
                        the host (hundreds of small kernels), where the same calls' time varies by up to 2x
                        from one process to the next; the replayed graphs compare the work itself.
``prefill_host_ms`` in the results: each row's median time until the call returned, before the GPU
finished; close to the row's total, the row is bound by the host launching kernels, not by the GPU.
``prefill_device_allocs``: the CUDA caching allocator's ``cudaMalloc``/``cudaFree`` calls and retries
(0 when every call reuses cached memory), and Python's garbage collections, during each row's timed
calls.
decode (greedy, KV cache), ms per generated token = (time(1 + N tokens) - time(1 token)) / N, N =
``--new-tokens`` (16), so the prefill is not counted:
  ``fxlora mixed``      ``generation.with_static_cache`` + ``capture_options`` + ``serve`` + ``greedy_generate``
  ``fxlora single``     the same captured decoder, one adapter active
  ``base graph``        the same captured decoder, unloaded
  ``PEFT mixed``        ``PeftModel.generate(..., adapter_names=[...])`` (transformers' DynamicCache)
  ``base HF``           ``model.generate`` (transformers' DynamicCache)
memory: bytes of the adapters as stored by the served module (stacked, zero-padded to the largest rank,
plus one all-zero base slot), by PEFT, and the adapters' own factors; peak CUDA memory of each call
above what was allocated before it.

Ratios: fxlora mixed / fxlora single (target <= 1.2) and PEFT mixed / fxlora mixed (target >= 3), for
prefill and for decode.  Prints markdown tables, writes JSON (``--out``) through
``fxlora.tools.results.write``, after every section (``"partial": true`` until the run ends).  A row that
fails is reported (``errors``) and the run goes on; the exit status is 1 if a check or a row failed.
``--budget-s`` (200 s by default on a GPU) skips the sections (a model, a decode benchmark) that would start
after it; a row still running ``--grace-s`` (90 s) after it is interrupted, reported, and the run ends.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from fxlora.tools import results
from fxlora.tools.benchkit import (
    DTYPES,
    MODELS,
    Budget,
    Errors,
    Log,
    allowed,
    build_model,
    cuda_graphed,
    finish,
    interleave,
    markdown,
    peak_bytes,
    ratio,
    rel_err,
    run_models,
    start,
    versions,
)

import fxlora

PREFILL_ROWS = ("fxlora mixed", "fxlora single", "base graph", "base HF", "PEFT single", "PEFT mixed",
                "fxlora mixed, CUDA graph", "fxlora single, CUDA graph", "base graph, CUDA graph")
GRAPHED = ("fxlora mixed", "fxlora single", "base graph")
#: ``--lower-branches`` -> ``gm.lower_branches`` of the fxlora single rows (docs/performance.md, eager lowering)
LOWER = {"off": False, "auto": "auto", "on": True}
DECODE_ROWS = ("fxlora mixed", "fxlora single", "base graph", "PEFT mixed", "base HF")
OWN = "adapters' own factors"


# --------------------------------------------------------------------------------------------------
# Models and adapters
# --------------------------------------------------------------------------------------------------


def targets(name: str, which: str, r: int) -> tuple[list[fxlora.Rule], list[str], bool, str]:
    """(fxlora rules, PEFT target_modules, PEFT fan_in_fan_out, description) for ``which`` in all|qv."""
    alpha = 2 * r
    if name == "gpt2-medium":
        mods = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] if which == "all" else ["attn.c_attn"]
        rules = [fxlora.Rule(f"transformer.h.*.{m}", r=r, alpha=alpha) for m in mods]
        peft_t = sorted({m.split(".")[1] for m in mods})
        what = ("every attention and MLP projection (c_attn, attn.c_proj, c_fc, mlp.c_proj)" if which == "all"
                else "the whole fused c_attn (q, k and v: PEFT has no per-slice mask)")
        return rules, peft_t, True, what
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if which == "all" \
        else ["q_proj", "v_proj"]
    rules = [fxlora.Rule(f"model.layers.*.{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}", r=r, alpha=alpha) for m in mods]
    return rules, mods, False, ", ".join(mods)


def make_factors(gm, names: list[str], seed: int) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Random non-zero float32 factors per (adapter, site), shaped like ``gm``'s: ``A ~ N(0, 1/in)``,
    ``B ~ N(0, (0.1 / (scale sqrt r))^2)``, so each site's update is ~10% of its input's scale."""
    out = {}
    for i, name in enumerate(names):
        for j, (site, spec) in enumerate(sorted(fxlora.graph_sites(gm, name).items())):
            A, B = gm.get_parameter(spec.lora_A), gm.get_parameter(spec.lora_B)
            g = torch.Generator(A.device).manual_seed(seed + 1000 * i + j)
            r = A.shape[0]
            a = torch.randn(A.shape, generator=g, device=A.device) / A.shape[1] ** 0.5
            b = torch.randn(B.shape, generator=g, device=B.device) * (0.1 / (spec.scale * r**0.5))
            out[name, site] = (a, b)
    return out


@torch.no_grad()
def load_fxlora(gm, factors) -> None:
    for (name, site), (a, b) in factors.items():
        spec = fxlora.graph_sites(gm, name)[site]
        gm.get_parameter(spec.lora_A).copy_(a)
        gm.get_parameter(spec.lora_B).copy_(b)


def build_peft(model, names: list[str], peft_targets: list[str], fan_in_fan_out: bool, r: int, factors,
               fp32_adapters: bool = False):
    """A PeftModel over a copy of ``model`` with the adapters ``names``, holding ``factors``; the adapters in
    the model's dtype as fxlora's (``autocast_adapter_dtype=False``), or in float32 as PEFT does by default
    for bf16/fp16 models (``fp32_adapters``)."""
    import peft

    cfg = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=peft_targets, fan_in_fan_out=fan_in_fan_out)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**cfg), adapter_name=names[0],
                             autocast_adapter_dtype=fp32_adapters)
    for name in names[1:]:
        pm.add_adapter(name, peft.LoraConfig(**cfg), autocast_adapter_dtype=fp32_adapters)
    layers = dict(pm.base_model.model.named_modules())
    peft_sites = {n for n, m in layers.items() if hasattr(m, "lora_A") and names[0] in m.lora_A}
    ours = {site for (name, site) in factors if name == names[0]}
    if peft_sites != ours:
        raise RuntimeError(f"PEFT adapts {len(peft_sites)} modules, fxlora {len(ours)} sites; differing: "
                           f"{sorted(peft_sites ^ ours)[:4]}")
    with torch.no_grad():
        for (name, site), (a, b) in factors.items():
            mod = layers[site]
            for ours_t, theirs in ((a, mod.lora_A[name].weight), (b, mod.lora_B[name].weight)):
                if tuple(theirs.shape) != tuple(ours_t.shape):
                    raise RuntimeError(f"PEFT's factor at {site} is {tuple(theirs.shape)}, fxlora's {tuple(ours_t.shape)}")
                theirs.copy_(ours_t)
    pm.set_adapter(names[0])
    return pm.eval()


def adapter_bytes(server, gm, pm, names: list[str]) -> dict[str, int]:
    """Bytes of the adapters as each holds them."""
    stacked = sum(p.nbytes for n, p in server.named_parameters() if n.endswith(("lora_A_stack", "lora_B_stack")))
    stacked += sum(b.nbytes for n, b in server.named_buffers() if n.endswith(("lora_scale_stack", "lora_slices")))
    own = 0
    for name in names:
        for spec in fxlora.graph_sites(gm, name).values():
            own += gm.get_parameter(spec.lora_A).nbytes + gm.get_parameter(spec.lora_B).nbytes
    theirs = sum(p.nbytes for n, p in pm.named_parameters() if ".lora_" in n)
    return {"fxlora served": stacked, OWN: own, "PEFT": theirs}


def per_sample_max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return max(rel_err(got[i], ref[i]) for i in range(ref.shape[0]))


def agreement(a: torch.Tensor, b: torch.Tensor, prompt: int) -> float:
    """Fraction of the generated tokens (after the prompt) that are equal."""
    if a.shape != b.shape:
        return 0.0
    return float((a[:, prompt:] == b[:, prompt:]).float().mean())


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


def run_model(name: str, a: argparse.Namespace, log: Log, errors: Errors, budget: Budget,
              checkpoint: Callable[[dict[str, Any]], None], res: dict[str, Any]) -> None:
    """Build, check and time one model, into ``res`` (so that what was measured survives an exception);
    ``checkpoint(res)`` after each section writes what is known so far."""
    from fxlora.generation import capture_options, greedy_generate, with_static_cache

    dev, dtype = a.device, DTYPES[a.dtype]
    res.update({"model": name, "notes": [], "checks": {}})
    t0 = time.perf_counter()
    model = build_model(name, a.small, dev, dtype, layers=a.layers)
    rules, peft_targets, fan_in_fan_out, what = targets(name, a.targets, a.r)
    vocab = model.config.vocab_size
    names = [f"a{i}" for i in range(a.adapters)]
    g = torch.Generator(dev).manual_seed(1)
    ids = torch.randint(1, vocab, (a.batch, a.prompt), generator=g, device=dev)
    adapter_ids = torch.arange(a.batch, device=dev) % a.adapters
    per_sample = [names[i] for i in adapter_ids.tolist()]
    res.update(params=sum(p.numel() for p in model.parameters()), targets=what, r=a.r, alpha=2 * a.r,
               adapters=a.adapters, batch=a.batch, prompt=a.prompt, new_tokens=a.new_tokens,
               build_s=time.perf_counter() - t0)
    log(f"{name}: {res['params'] / 1e6:.0f}M parameters, {a.dtype} on {dev}; adapters on {what}")

    # ---- fxlora: prefill graph (torch.export, use_cache=False), 8 adapters, served copy
    t0 = time.perf_counter()
    # a clone: with a view as example input, torch.export's guards read ``input_ids._base`` on every call
    # and fail on an input that is not a view
    gm = fxlora.rewrite(model, rules, adapter=names[0], example_inputs=(ids[:2, :8].clone(),),
                        example_kwargs={"use_cache": False})
    res["capture_rewrite_s"] = time.perf_counter() - t0
    for n in names[1:]:
        fxlora.add_adapter(gm, rules, n)
    factors = make_factors(gm, names, seed=10)
    load_fxlora(gm, factors)
    server = fxlora.serve(gm, names).eval()
    fxlora.set_adapter(gm, names[0])
    gm.eval()
    gm.lower_branches = LOWER[a.lower_branches]  # the single row only: a served module stacks its factors
    base_gm = fxlora.unload(gm).eval()
    res["sites_per_adapter"] = len(fxlora.graph_sites(gm, names[0]))
    log(f"  fxlora: captured and rewritten in {res['capture_rewrite_s']:.1f} s, {res['sites_per_adapter']} sites "
        f"x {len(names)} adapters, served")

    pm = None
    with errors.guard(f"{name}: PEFT model") as ok:
        pm = build_peft(model, names, peft_targets, fan_in_fan_out, a.r, factors, a.peft_adapter_dtype == "fp32")
    if not ok["ok"]:
        pm = None
    res["adapter_bytes"] = adapter_bytes(server, gm, pm, names) if pm is not None else None

    # ---- prefill: checks
    with errors.guard(f"{name}: prefill checks"), torch.no_grad():
        served = server(ids, adapter_ids=adapter_ids, use_cache=False).logits
        alone = torch.empty_like(served)
        for slot, n in enumerate(names):
            fxlora.set_adapter(gm, n)
            rows = (adapter_ids == slot).nonzero().flatten()
            alone[rows] = gm(ids[rows], use_cache=False).logits
        fxlora.set_adapter(gm, names[0])
        gm.eval()
        # the noise floor: one adapter on the whole batch against the same adapter on its own samples (in
        # half precision the GEMMs of other shapes round differently); the checks allow a few times it
        rows0 = (adapter_ids == 0).nonzero().flatten()
        floor = per_sample_max_err(gm(ids, use_cache=False).logits[rows0], alone[rows0])
        tol = allowed(dtype, floor)[0]
        base_out = base_gm(ids, use_cache=False).logits
        c = res["checks"]
        c["noise_floor"] = floor
        c["served_vs_alone"] = per_sample_max_err(served, alone)
        c["adapter_effect"] = min(rel_err(alone[i], base_out[i]) for i in range(a.batch))
        del base_out
        if pm is not None:
            theirs = pm(input_ids=ids, use_cache=False, adapter_names=per_sample).logits
            c["peft_mixed_vs_served"] = per_sample_max_err(theirs, served)
            del theirs
        c["tolerance"] = tol
        c["ok"] = (c["served_vs_alone"] <= tol and c.get("peft_mixed_vs_served", 0.0) <= tol
                   and c["adapter_effect"] > 3 * tol)
        log(f"  check {'ok' if c['ok'] else 'FAILED'}: served vs each sample alone {c['served_vs_alone']:.2e}, "
            f"PEFT mixed vs served {c.get('peft_mixed_vs_served', float('nan')):.2e} (tolerance {tol:g}); "
            f"adapters change the output by >= {c['adapter_effect']:.2e}; noise floor {floor:.1e}")
        del served, alone
    if not res["checks"].get("ok"):
        errors.append({"row": f"{name}: prefill checks", "error": "check failed or did not run"})

    # ---- prefill: timing
    fns = {
        "fxlora mixed": lambda: server(ids, adapter_ids=adapter_ids, use_cache=False),
        "fxlora single": lambda: gm(ids, use_cache=False),
        "base graph": lambda: base_gm(ids, use_cache=False),
        "base HF": lambda: model(input_ids=ids, use_cache=False),
    }
    if pm is not None:
        fns["PEFT single"] = lambda: pm(input_ids=ids, use_cache=False)
        fns["PEFT mixed"] = lambda: pm(input_ids=ids, use_cache=False, adapter_names=per_sample)
    if torch.device(dev).type == "cuda":
        # the fxlora rows again, each captured in a CUDA graph and replayed: the device's time without the
        # host's (PEFT's mixed path reads its adapter names on the host: it cannot be captured)
        with torch.no_grad():
            for k in GRAPHED:
                with errors.guard(f"{name}: {k} in a CUDA graph") as ok:
                    graphed = cuda_graphed(fns[k], dev)
                    err = per_sample_max_err(graphed().logits, fns[k]().logits)
                    res["checks"][f"{k}, CUDA graph vs eager"] = err
                    if err > res["checks"].get("tolerance", 0.0):
                        raise AssertionError(f"replayed CUDA graph differs from the eager call by {err:.2e}")
                if ok["ok"]:
                    fns[f"{k}, CUDA graph"] = graphed
    with torch.no_grad():
        log(f"  prefill: timing {len(fns)} rows x {a.repeats} interleaved repeats")
        res["prefill_host_ms"], res["prefill_device_allocs"] = {}, {}
        res["prefill_ms"] = interleave(fns, a.repeats, dev, errors, label=f"{name} prefill ",
                                       host=res["prefill_host_ms"], allocs=res["prefill_device_allocs"])
        res["prefill_peak_bytes"] = {}
        for k, fn in fns.items():
            if k in res["prefill_ms"]:
                with errors.guard(f"{name} prefill peak memory {k}"):
                    res["prefill_peak_bytes"][k] = peak_bytes(fn, dev)
        if a.profile:
            for k in ("fxlora mixed", "fxlora single"):
                if k in res["prefill_ms"]:
                    log(f"  prefill: where the host's time goes, {k} (cProfile, 3 calls, top functions)")
                    profile_host(fns[k], calls=3)
                    if torch.device(dev).type == "cuda":
                        log(f"  prefill: where the device's time goes, {k} (torch.profiler, 3 calls, top kernels)")
                        profile_device(fns[k], calls=3)
    pf = res["prefill_ms"]
    res["prefill_ratios"] = {"fxlora mixed / fxlora single": ratio(pf.get("fxlora mixed"), pf.get("fxlora single")),
                             "fxlora mixed / fxlora single, CUDA graphs": ratio(pf.get("fxlora mixed, CUDA graph"),
                                                                              pf.get("fxlora single, CUDA graph")),
                             "PEFT mixed / fxlora mixed": ratio(pf.get("PEFT mixed"), pf.get("fxlora mixed"))}
    log("  prefill ms: " + ", ".join(f"{k} {v:.2f}" for k, v in pf.items()))
    log("  prefill ms until the call returned (host): "
        + ", ".join(f"{k} {v:.2f}" for k, v in res["prefill_host_ms"].items()))
    if any(any(v.values()) for v in res["prefill_device_allocs"].values()):
        log(f"  prefill allocations and collections during timing: {res['prefill_device_allocs']}")
    checkpoint(res)
    fns.clear()
    gc.collect()

    # ---- decode
    res["decode_ms_per_token"] = {}
    if a.no_decode:
        res["notes"].append("decode not run (--no-decode)")
    elif budget.allows(f"{name} decode", needs=15 if a.small else 45, notes=res["notes"]):
        with errors.guard(f"{name}: decode"):
            _decode(res, model, pm, rules, names, factors, ids, adapter_ids, per_sample, a, log, errors,
                    capture_options, greedy_generate, with_static_cache)
    res["decode_ratios"] = {
        "fxlora mixed / fxlora single": ratio(res["decode_ms_per_token"].get("fxlora mixed"),
                                              res["decode_ms_per_token"].get("fxlora single")),
        "PEFT mixed / fxlora mixed": ratio(res["decode_ms_per_token"].get("PEFT mixed"),
                                           res["decode_ms_per_token"].get("fxlora mixed")),
    }
    checkpoint(res)


def _decode(res, model, pm, rules, names, factors, ids, adapter_ids, per_sample, a, log, errors,
            capture_options, greedy_generate, with_static_cache) -> None:
    dev, dtype = a.device, DTYPES[a.dtype]
    n = a.new_tokens + 1  # the first token comes from the prefill
    label = f"{res['model']}: decode"
    server = dec = base = None
    with errors.guard(f"{label} capture (fxlora.generation)"):
        t0 = time.perf_counter()
        dec = fxlora.rewrite(with_static_cache(model), rules, adapter=names[0], capture=capture_options(model))
        res["decode_capture_rewrite_s"] = time.perf_counter() - t0
        for name in names[1:]:
            fxlora.add_adapter(dec, rules, name)
        if set(fxlora.graph_sites(dec, names[0])) != {s for (nm, s) in factors if nm == names[0]}:
            raise RuntimeError("the decoder capture found other sites than the prefill capture")
        load_fxlora(dec, factors)
        server = fxlora.serve(dec, names).eval()
        fxlora.set_adapter(dec, names[0])
        dec.eval()
        dec.lower_branches = LOWER[a.lower_branches]
        base = fxlora.unload(dec).eval()
        log(f"  decode: static-cache decoder captured and rewritten in {res['decode_capture_rewrite_s']:.1f} s")
    mask = torch.ones_like(ids)

    def gen(module, k, **kw):
        return lambda: greedy_generate(module, ids, max_new_tokens=k, model=model, **kw)

    def hf(m, k, **kw):
        return lambda: m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, do_sample=False, **kw)

    # checks: the served decoder's tokens against each sample alone and against PEFT
    c = res["checks"]
    with errors.guard(f"{label} checks"), torch.no_grad():
        if server is None:
            raise RuntimeError("no fxlora decoder to check")
        served = gen(server, n, adapter_ids=adapter_ids)()
        alone = torch.empty_like(served)
        try:
            for slot, name in enumerate(names):
                fxlora.set_adapter(dec, name)
                rows = (adapter_ids == slot).nonzero().flatten()
                alone[rows] = greedy_generate(dec, ids[rows], max_new_tokens=n, model=model)
        finally:
            fxlora.set_adapter(dec, names[0])
            dec.eval()
        c["decode_tokens_served_vs_alone"] = agreement(served, alone, a.prompt)
        if pm is not None:
            c["decode_tokens_peft_vs_served"] = agreement(hf(pm, n, adapter_names=per_sample)(), served, a.prompt)
        exact = dtype == torch.float32
        c["decode_ok"] = c["decode_tokens_served_vs_alone"] == 1.0 and c.get("decode_tokens_peft_vs_served", 1.0) == 1.0
        log(f"  decode check: generated tokens equal, served vs alone {c['decode_tokens_served_vs_alone']:.1%}, "
            f"PEFT vs served {c.get('decode_tokens_peft_vs_served', float('nan')):.1%}"
            + ("" if exact else " (bf16: reported, not required)"))
        if exact and not c["decode_ok"]:
            errors.append({"row": f"{label} checks", "error": "tokens differ in float32"})

    fns = {}
    for k in (1, n):
        if server is not None:
            fns[f"fxlora mixed/{k}"] = gen(server, k, adapter_ids=adapter_ids)
            fns[f"fxlora single/{k}"] = gen(dec, k)
            fns[f"base graph/{k}"] = gen(base, k)
        if pm is not None:
            fns[f"PEFT mixed/{k}"] = hf(pm, k, adapter_names=per_sample)
        fns[f"base HF/{k}"] = hf(model, k)
    with torch.no_grad():
        log(f"  decode: timing {len(fns) // 2} rows x (1 and {n} tokens) x {a.decode_repeats} interleaved repeats")
        ms = interleave(fns, a.decode_repeats, dev, errors, label=f"{res['model']} decode ")
        res["decode_total_ms"] = ms
        res["decode_peak_bytes"] = {}
        for row in DECODE_ROWS:
            if f"{row}/1" in ms and f"{row}/{n}" in ms:
                res["decode_ms_per_token"][row] = (ms[f"{row}/{n}"] - ms[f"{row}/1"]) / (n - 1)
                with errors.guard(f"{res['model']} decode peak memory {row}"):
                    res["decode_peak_bytes"][row] = peak_bytes(fns[f"{row}/{n}"], dev)
    log("  decode ms/token: " + ", ".join(f"{k} {v:.2f}" for k, v in res["decode_ms_per_token"].items()))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _mib(b: int | None) -> float | None:
    return None if b is None else b / 2**20


def tables(all_res: list[dict[str, Any]]) -> str:
    out = []
    for res in all_res:
        pf, dc = res.get("prefill_ms", {}), res.get("decode_ms_per_token", {})
        peaks, dpeaks = res.get("prefill_peak_bytes", {}), res.get("decode_peak_bytes", {})
        rows = []
        for row in PREFILL_ROWS:
            rows.append([row, pf.get(row), ratio(pf.get(row), pf.get("fxlora single")), _mib(peaks.get(row)),
                         dc.get(row), ratio(dc.get(row), dc.get("fxlora single")), _mib(dpeaks.get(row))])
        g = res.get
        out.append(f"\n### {res['model']}: batch {g('batch')} x {g('prompt')} tokens, {g('adapters')} adapters "
                   f"r={g('r')} on {g('targets')}\n")
        out.append(markdown(["row", "prefill ms", "x fxlora single", "prefill peak MiB", "decode ms/token",
                             "x fxlora single", f"decode peak MiB ({(g('new_tokens') or 0) + 1} tokens)"], rows))
        ab = res.get("adapter_bytes")
        if ab:
            out.append(f"\nadapter storage: fxlora served {_mib(ab['fxlora served']):.2f} MiB, PEFT {_mib(ab['PEFT']):.2f} MiB, "
                       f"the adapters' own factors {_mib(ab[OWN]):.2f} MiB")
    out.append("\n### Targets\n")
    rows = []
    for res in all_res:
        p, d = res.get("prefill_ms", {}), res.get("decode_ms_per_token", {})
        ab = res.get("adapter_bytes") or {}
        own = ab.get(OWN)
        rows.append([res["model"], ratio(p.get("fxlora mixed"), p.get("fxlora single")),
                     ratio(p.get("fxlora mixed, CUDA graph"), p.get("fxlora single, CUDA graph")),
                     ratio(p.get("PEFT mixed"), p.get("fxlora mixed")),
                     ratio(d.get("fxlora mixed"), d.get("fxlora single")), ratio(d.get("PEFT mixed"), d.get("fxlora mixed")),
                     ratio(ab.get("fxlora served"), own), ratio(ab.get("PEFT"), own),
                     "ok" if res.get("checks", {}).get("ok") else "FAILED"])
    out.append(markdown(["model", "prefill mixed / single (<= 1.2)", "the same, CUDA graphs",
                         "prefill PEFT / fxlora mixed (>= 3)",
                         "decode mixed / single (<= 1.2)", "decode PEFT / fxlora mixed (>= 3)",
                         "served bytes / own", "PEFT bytes / own", "checks"], rows))
    return "\n".join(out)


def profile_host(fn: Callable[[], Any], calls: int) -> None:
    """Print the functions that take the host's time in ``calls`` calls of ``fn`` (cProfile, by own time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(14)
    sys.stdout.flush()


def profile_device(fn: Callable[[], Any], calls: int) -> None:
    """Print the kernels that take the device's time in ``calls`` calls of ``fn`` (torch.profiler, by total
    device time), and the device's busy time against the wall time of the calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=16, max_name_column_width=70)
    print(table, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny configs, float32, CPU: a smoke test")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available, cpu with --small)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--models", default=",".join(reversed(MODELS)), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--targets", choices=("all", "qv"), default="all")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lower-branches", choices=tuple(LOWER), default="auto",
                   help="gm.lower_branches of the 'fxlora single' rows (the eager lowering): auto (fxlora's "
                        "default), on or off")
    p.add_argument("--adapters", type=int, default=None, help="default 8 (4 with --small)")
    p.add_argument("--batch", type=int, default=None, help="default 32 (8 with --small)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens; default 128 (12 with --small)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps timed; default 16 (3 with --small)")
    p.add_argument("--repeats", type=int, default=None, help="prefill repeats; default 7 (2 with --small)")
    p.add_argument("--decode-repeats", type=int, default=None, help="default 3 (1 with --small)")
    p.add_argument("--peft-adapter-dtype", choices=("model", "fp32"), default="model",
                   help="PEFT's adapters in the model's dtype, as fxlora's (default; autocast_adapter_dtype=False), "
                        "or in float32 (PEFT's own default for bf16 models: 2x the bytes, the branch in float32)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="after the prefill timing, print where the host's time (cProfile) and on CUDA the device's "
                        "time (torch.profiler's kernels) go in the fxlora rows")
    p.add_argument("--layers", type=int, default=None, help="override the models' depth (for quick tests)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip sections that would start after this many seconds (default 200; none with --small)")
    p.add_argument("--grace-s", type=float, default=90.0,
                   help="a row still running this long after the budget is interrupted, reported, and the run ends")
    p.add_argument("--out", metavar="FILE.json")
    a = p.parse_args(argv)
    small = a.small
    a.device = a.device or ("cpu" if small or not torch.cuda.is_available() else "cuda")
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    defaults = dict(adapters=(4, 8), batch=(8, 32), prompt=(12, 128), new_tokens=(3, 16), repeats=(2, 7),
                    decode_repeats=(1, 3))
    for k, (s, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, s if small else full)
    if a.budget_s is None and not small:
        a.budget_s = 200.0
    if a.batch % a.adapters:
        p.error("--batch must be a multiple of --adapters")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but CUDA is not available")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}: use {', '.join(MODELS)}")

    log, errors, budget, dev_name = start(a.device, a.budget_s, a.grace_s)
    log(f"bench_serve on {dev_name}, {a.dtype}; {versions()}")

    def payload(models: list[dict[str, Any]], text: str | None, partial: bool) -> dict[str, Any]:
        return {
            "benchmark": "bench_serve", "small": small, "partial": partial, "device": dev_name, "dtype": a.dtype,
            "versions": versions(),
            "settings": {k: getattr(a, k) for k in ("targets", "r", "adapters", "batch", "prompt", "new_tokens",
                                                    "repeats", "decode_repeats", "budget_s", "peft_adapter_dtype")},
            "models": models, "errors": list(errors), "seconds": log.elapsed(), "markdown": text,
        }

    def write(models: list[dict[str, Any]], text: str | None, partial: bool) -> None:
        results.write(a.out, payload(models, text, partial), script=__file__, argv=argv)

    all_res = run_models(models, lambda m, res, checkpoint: run_model(m, a, log, errors, budget, checkpoint, res),
                         write, device=a.device, small=small, errors=errors, budget=budget)
    text = tables(all_res)
    print(text, flush=True)
    return finish(all_res, text, errors, write, log)


if __name__ == "__main__":
    raise SystemExit(main())
