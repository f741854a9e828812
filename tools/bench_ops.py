"""Benchmark: the fxlora::lora_linear op's paths against the base linear layer, on a GPU.

    python -m fxlora.tools.bench_ops [--out ops.json] [--check-only] [--shapes all|llama|gpt2|tiny]
                                     [--dtype bf16|fp16] [--r 16] [--repeats 25]

For each shape (T tokens, in -> out, rank r; Llama-3.2-1B-like and GPT-2-Medium-like projections):

1. Checks every path (composite, addmm, triton) against a float32 reference: the output and the
   gradients of x, A and B must lie within the op's stated bound (``fxlora.ops`` docstring); prints the
   worst error in units of ``u·|f|`` (u: the dtype's unit roundoff) and fails if any exceeds it, or if
   a path did not run the kernels it names.
2. Times, interleaved and repeated, with the L2 cache flushed before every call and CUDA events around
   it (GPU time; the host time to enqueue the call is reported too), the median of:

   ``base``     F.linear(x, W, b)                                   the frozen layer alone
   ``unfused``  F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s  the LoRA branch as plain ops
   ``addmm``    fxlora::lora_linear on its "addmm" path              cuBLAS, epilogue tricks
   ``triton``   fxlora::lora_linear on its "triton" path             fused GEMM + epilogue
   ``auto``     fxlora::lora_linear on its default path              per call, see choose_path

   forward (under no_grad) and forward+backward (base frozen; gradients of x, A and B, as in the
   middle of a LoRA fine-tune), and the ratio of each to ``base``; the line above the table names
   the path ``auto`` takes for the forward and the backward GEMM.  Also times the shrink
   ``x @ A^T`` alone, ``torch.mm`` against the Triton kernel (``shrink_ms``).

Writes everything to ``--out`` as JSON, with the Triton configurations the autotuner picked.
``--shapes tiny`` runs on CPU too (with ``TRITON_INTERPRET=1`` and ``--dtype fp16`` for the Triton
path), to smoke-test this script without a GPU; times there mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fxlora.tools import results

from fxlora import ops

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (model, T, in, out, bias)
_SHAPES = {
    "llama": [("llama-1.2b", 4096, i, o, False) for i, o in [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]],
    "gpt2": [
        ("gpt2-medium", t, i, o, True)
        for t in (512, 4096)
        for i, o in [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024)]
    ],
    "tiny": [("tiny", 96, 64, 80, True), ("tiny", 70, 48, 40, False)],
}
_SHAPES["all"] = _SHAPES["llama"] + _SHAPES["gpt2"]
PATHS = ("composite", "addmm", "triton")
VARIANTS = ("base", "unfused", "addmm", "triton", "auto")
_U = {torch.bfloat16: 2**-8, torch.float16: 2**-11}  # unit roundoff
_ROUNDINGS = {"triton": 2, "addmm": 3, "composite": 4}  # the c of the op's bound (fxlora.ops docstring)


def make_inputs(T: int, n_in: int, n_out: int, r: int, bias: bool, dtype: torch.dtype, device: str, seed: int = 0):
    """Activations, a frozen base layer, and trained-looking (non-zero) LoRA factors."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(shape, generator=g, device=device) * std).to(dtype)

    x = rand(T, n_in)
    W = rand(n_out, n_in, std=n_in**-0.5)
    b = rand(n_out, std=0.1) if bias else None
    A = rand(r, n_in, std=n_in**-0.5)
    B = rand(n_out, r, std=r**-0.5 * 0.1)
    return x, W, b, A, B


def unfused(x, W, b, A, B, s):
    return F.linear(x, W, b) + F.linear(F.linear(x, A), B) * s


# --------------------------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------------------------


def triton_runs(x: torch.Tensor, n_out: int, r: int) -> bool:
    """Whether the "triton" path runs Triton kernels for this shape here (on CPU only under
    ``TRITON_INTERPRET=1``)."""
    with ops.use_path("triton"):
        return ops.choose_path("gemm", x, n_out, r) == "triton"


def check_shape(x, W, b, A, B, s: float, paths=PATHS) -> dict[str, dict[str, float]]:
    """For each path, the worst error of the output and of dx, dA, dB against a float32 reference,
    in units of ``u·|f|``, and whether it is within the op's bound ``(c·u + K·2**-24)·|f|``."""
    dtype = x.dtype
    u = _U[dtype]
    K = max(x.shape[0], W.shape[0], W.shape[1])
    dy = torch.randn(x.shape[0], W.shape[0], device=x.device, generator=torch.Generator(x.device).manual_seed(1))
    dy = dy.to(dtype)
    # Reference and magnitudes (the same formula on absolute values) in float32, without TF32.
    exact, mag = [], []
    for absolute in (False, True):
        f32 = [None if t is None else (t.float().abs() if absolute else t.float()) for t in (x, W, b, A, B)]
        xr, Ar, Br = (f32[i].requires_grad_() for i in (0, 3, 4))
        y = unfused(xr, f32[1], f32[2], Ar, Br, abs(s) if absolute else s)
        grads = torch.autograd.grad(y, (xr, Ar, Br), dy.float().abs() if absolute else dy.float())
        (mag if absolute else exact).extend([y.detach(), *grads])
    report: dict[str, dict[str, float]] = {}
    for path in paths:
        xq, Aq, Bq = (t.detach().requires_grad_() for t in (x, A, B))
        ops.counters.clear()
        with ops.use_path(path):
            y = ops.lora_linear(xq, W, b, Aq, Bq, s)
            got = [y.detach(), *torch.autograd.grad(y, (xq, Aq, Bq), dy)]
        expected = {"triton": {"gemm.triton": 2, "shrink.triton": 3}}.get(
            path, {f"gemm.{path}": 2, f"shrink.{path}": 3}
        )
        ran = dict(ops.counters)
        if ran != expected:
            raise SystemExit(f"path {path!r} ran {ran}, expected {expected}: is Triton importable here?")
        c = _ROUNDINGS[path]
        row = {}
        for name, g, e, m in zip(("y", "dx", "dA", "dB"), got, exact, mag):
            err = (g.float() - e).abs()
            row[name] = float((err / (u * m).clamp_min(1e-30)).max())
            row[name + "_ok"] = bool((err <= (c * u + 2 * K * 2**-24) * m).all())
        report[path] = row
    return report


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class _Timer:
    """Times one call, returning ``(device ms, host ms)``.

    On CUDA: a 1 GiB memset before the call flushes the L2 cache and keeps the GPU busy for ~0.3 ms,
    so the CPU enqueues the call's kernels ahead of the GPU and CUDA events around the call measure
    GPU time, not Python overhead; the host time (``perf_counter`` around the call, which returns
    once its kernels are enqueued) is that overhead.  On CPU both are wall-clock time.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        if self.cuda:
            self.flush = torch.empty(2**30, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
            return ms, ms
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host = (time.perf_counter() - t0) * 1e3
        end.record()
        end.synchronize()
        return start.elapsed_time(end), host


def time_shape(x, W, b, A, B, s: float, repeats: int, timer: _Timer, variants=VARIANTS) -> dict[str, dict[str, float]]:
    """Median forward and forward+backward times (ms) of each variant, interleaved."""
    xg, Ag, Bg = (t.detach().requires_grad_() for t in (x, A, B))
    dy = torch.randn(x.shape[0], W.shape[0], device=x.device, dtype=x.dtype)
    forward = {
        "base": lambda x_, A_, B_: F.linear(x_, W, b),
        "unfused": lambda x_, A_, B_: unfused(x_, W, b, A_, B_, s),
        "addmm": lambda x_, A_, B_: ops.lora_linear(x_, W, b, A_, B_, s),
        "triton": lambda x_, A_, B_: ops.lora_linear(x_, W, b, A_, B_, s),
        "auto": lambda x_, A_, B_: ops.lora_linear(x_, W, b, A_, B_, s),
    }

    def fwd(name):
        def run():
            with torch.no_grad():
                forward[name](x, A, B)

        return run

    def fwd_bwd(name):
        def run():
            y = forward[name](xg, Ag, Bg)
            torch.autograd.grad(y, (xg,) if name == "base" else (xg, Ag, Bg), dy)

        return run

    def on_path(name, run):
        # The path is read at call time, in the backward too: force it around the whole run.
        def call():
            with ops.use_path(name if name in PATHS else "auto"):
                run()

        return call

    def shrink(path):
        def run():
            with torch.no_grad(), ops.use_path(path):
                ops.lora_shrink(x, A, 1.0)

        return run

    runs = {
        (name, kind): on_path(name, make(name))
        for name in variants
        for kind, make in (("fwd", fwd), ("fwd_bwd", fwd_bwd))
    }
    shrinks = (("mm", "addmm"), ("triton", "triton")) if "triton" in variants else (("mm", "addmm"),)
    runs.update({(name, "shrink"): shrink(path) for name, path in shrinks})
    for run in runs.values():  # warm up: autotuning, cuBLAS heuristics, allocator
        for _ in range(3):
            run()
    times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(timer(run))
    medians: dict[str, dict[str, float]] = {}
    for (name, kind), ts in times.items():
        medians.setdefault(kind, {})[name] = statistics.median(t[0] for t in ts)
        medians.setdefault(kind + "_host", {})[name] = statistics.median(t[1] for t in ts)
    return medians


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _triton_configs() -> dict[str, str]:
    try:
        from fxlora import triton_lora
    except ImportError:
        return {}
    return triton_lora.autotuned_configs()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results to this JSON file")
    p.add_argument("--check-only", action="store_true", help="check every path against float32; no timing")
    p.add_argument("--shapes", default="all", choices=sorted(_SHAPES))
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if not a.device.startswith("cuda") and a.shapes != "tiny":
        p.error("without CUDA only --shapes tiny runs (a smoke test; set TRITON_INTERPRET=1 for the Triton path)")
    if a.device.startswith("cuda"):
        try:
            from fxlora import triton_lora  # noqa: F401  (surface an import error here, not as a fallback)
        except ImportError as e:
            print(f"Triton does not import: {e}", file=sys.stderr)
            return 1

    dtype, s = _DTYPES[a.dtype], a.alpha / a.r
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
    timer = None if a.check_only else _Timer(a.device)
    device_name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "CPU"
    print(f"fxlora::lora_linear on {device_name}, {a.dtype}, r={a.r}, scale={s:g}; torch {torch.__version__}")
    rows, failed, t_start = [], False, time.perf_counter()
    for model, T, n_in, n_out, bias in _SHAPES[a.shapes]:
        x, W, b, A, B = make_inputs(T, n_in, n_out, a.r, bias, dtype, a.device)
        auto = {
            "fwd": ops.choose_path("gemm", x, n_out, a.r),
            "bwd": ops.choose_path("gemm", x.new_empty(T, n_out), n_in, a.r),
        }
        with_triton = triton_runs(x, n_out, a.r)
        if not with_triton and a.device.startswith("cuda"):
            raise SystemExit(f"the Triton kernels do not take {a.dtype} r={a.r} on {device_name}")
        paths = PATHS if with_triton else tuple(p for p in PATHS if p != "triton")
        variants = VARIANTS if with_triton else tuple(v for v in VARIANTS if v != "triton")
        check = check_shape(x, W, b, A, B, s, paths)
        ok = all(v for row in check.values() for k, v in row.items() if k.endswith("_ok"))
        failed |= not ok
        entry = {"model": model, "T": T, "in": n_in, "out": n_out, "bias": bias, "auto": auto, "check": check}
        label = f"{model} T={T} {n_in}->{n_out}{' +bias' if bias else ''}"
        worst = "  ".join(
            f"{path} {max(v for k, v in row.items() if not k.endswith('_ok')):.2f}" for path, row in check.items()
        )
        print(
            f"\n{label}: check {'ok' if ok else 'FAILED'} (worst error / u|f|: {worst}); "
            f"auto: fwd {auto['fwd']}, bwd {auto['bwd']}"
        )
        if timer is not None:
            t = time_shape(x, W, b, A, B, s, a.repeats, timer, variants)
            entry["ms"] = t
            print(f"  {'variant':<10}{'fwd ms':>10}{'x base':>9}{'fwd+bwd ms':>13}{'x base':>9}{'host fwd+bwd ms':>18}")
            for name in variants:
                f, fb, host = t["fwd"][name], t["fwd_bwd"][name], t["fwd_bwd_host"][name]
                print(
                    f"  {name:<10}{f:>10.4f}{f / t['fwd']['base']:>9.3f}{fb:>13.4f}{fb / t['fwd_bwd']['base']:>9.3f}"
                    f"{host:>18.4f}"
                )
            print("  shrink x @ A^T alone: " + ", ".join(f"{k} {v:.4f} ms" for k, v in t["shrink"].items()))
        rows.append(entry)
        del x, W, b, A, B
    elapsed = time.perf_counter() - t_start
    print(f"\n{'all checks passed' if not failed else 'SOME CHECKS FAILED'}; {elapsed:.0f} s")
    if a.out:
        meta = {
            "device": device_name,
            "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),
            "dtype": a.dtype,
            "r": a.r,
            "scale": s,
            "repeats": a.repeats,
            "thresholds": {"TRITON_MIN_ROWS": ops.TRITON_MIN_ROWS, "TRITON_MAX_K": ops.TRITON_MAX_K},
            "seconds": elapsed,
        }
        results.write(a.out, {**meta, "shapes": rows, "triton_configs": _triton_configs()}, script=__file__, argv=argv)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
