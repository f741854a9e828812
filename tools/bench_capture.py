"""Benchmark: the cost of fxlora's capture + rewrite against torch.export alone.

    python -m fxlora.tools.bench_capture [--layers 12] [--hidden 768] [--repeats 3] [--out FILE.json]

Builds a BERT-base-size ``transformers.BertModel`` from a config (random weights, no download), then
times, interleaved and repeated, (a) ``torch.export.export`` of the model and (b)
``fxlora.rewrite(model, query/value rules, example_inputs=..., capture="export")``, which runs the
same export plus the shadow copy, the train/eval fix-up, rule resolution and the rewrite pass.
Prints the medians and their ratio (b / a).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", metavar="FILE.json", help="write the results here (e.g. tools/results/capture-cpu.json)")
    args = parser.parse_args(argv)

    import transformers

    import fxlora

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
    )
    model = transformers.BertModel(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, args.seq))
    rules = [
        fxlora.Rule("encoder.layer.*.attention.self.query", r=8, alpha=16),
        fxlora.Rule("encoder.layer.*.attention.self.value", r=8, alpha=16),
    ]
    dims = {"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}}

    def export_only():
        model.train()  # fxlora captures in training mode, so time torch.export on the same graph
        try:
            torch.export.export(model, (x,), dynamic_shapes=dims, strict=False)
        finally:
            model.eval()

    def fxlora_rewrite():
        fxlora.rewrite(model, rules, example_inputs=(x,), capture="export")

    runs: dict[str, list[float]] = {"torch.export": [], "fxlora capture + rewrite": []}
    fns = {"torch.export": export_only, "fxlora capture + rewrite": fxlora_rewrite}
    for fn in fns.values():  # warm-up: imports, dispatcher caches
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"BertModel: {args.layers} layers, hidden {args.hidden}, {params / 1e6:.1f}M parameters, "
          f"input (2, {args.seq}); median of {args.repeats} interleaved runs")
    for name, value in med.items():
        print(f"  {name:<26} {value:7.2f} s")
    ratio = med["fxlora capture + rewrite"] / med["torch.export"]
    print(f"  ratio: {ratio:.2f}x torch.export alone")
    from fxlora.tools import results

    results.write(args.out, {"layers": args.layers, "hidden": args.hidden, "seq": args.seq, "parameters": params,
                             "repeats": args.repeats, "median_s": med, "ratio": ratio}, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
