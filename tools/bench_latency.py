"""Benchmark: forward latency of the unmerged (LoRA branches, also with siblings fused) and folded
models, as ratios to the base.

    python -m fxlora.tools.bench_latency [--model gpt2_medium] [--device cuda] [--dtype bf16]
                                         [--batch 8] [--seq 256] [--repeats 30] [--out FILE.json]

The base is ``torch.fx.symbolic_trace`` of the zoo model, so all three run as GraphModules. Runs are
interleaved (base, folded, unmerged, base, ...) and the median of each is reported, with CUDA
synchronised around every run on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fxlora.tools import results

import fxlora
from fxlora import zoo

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2_medium", help="a zoo factory (gpt2_tiny, gpt2_medium, roberta_base, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(_DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--out", metavar="FILE.json", help="write the results here (e.g. tools/results/latency-cpu.json)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = getattr(zoo, a.model)().to(a.device, _DTYPES[a.dtype]).eval()
    if isinstance(model, zoo.GPT2):
        rules = [fxlora.Rule("transformer.h.*.attn.c_attn", r=a.r, alpha=2 * a.r, enable_lora=[True, False, True]),
                 fxlora.Rule("transformer.h.*.mlp.c_*", r=a.r, alpha=2 * a.r)]
        vocab = model.config.vocab_size
    else:
        rules = [fxlora.Rule("re:encoder\\.layer\\.\\d+\\.attention\\.self\\.(query|key|value)", r=a.r, alpha=2 * a.r)]
        vocab = model.config.vocab_size
    base = torch.fx.symbolic_trace(model)
    unmerged = fxlora.rewrite(model, rules).eval()
    with torch.no_grad():
        for n in fxlora.lora_parameter_names(unmerged):
            unmerged.get_parameter(n).normal_(0, 0.01)
    folded = fxlora.fold(unmerged).eval()
    fused = fxlora.rewrite(model, rules, fuse_siblings=True).eval()
    fxlora.load_lora_state_dict(fused, fxlora.lora_state_dict(unmerged))
    x = torch.randint(0, vocab, (a.batch, a.seq), device=a.device)
    fns = {"base": base, "folded": folded, "unmerged": unmerged, "unmerged, siblings fused": fused}
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(3):
                fn(x)
        for _ in range(a.repeats):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn(x)
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    print(f"{a.model} on {dev}, {a.dtype}, batch {a.batch} x {a.seq} tokens, {len(fxlora.graph_sites(unmerged))} sites "
          f"r={a.r}; median of {a.repeats} interleaved runs, torch {torch.__version__}")
    for name in fns:
        print(f"  {name:<25} {med[name]:8.2f} ms   {med[name] / med['base']:.3f}x base")
    results.write(a.out, {
        "model": a.model, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "r": a.r, "repeats": a.repeats,
        "sites": len(fxlora.graph_sites(unmerged)), "median_ms": med,
        "ratio_to_base": {k: v / med["base"] for k, v in med.items()},
    }, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
