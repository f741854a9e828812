"""``fxlora demo``: the whole workflow on a built-in GPT-2-style model and a synthetic task.

report -> rewrite and freeze -> train -> save the LoRA checkpoint -> load it into a fresh rewrite ->
fold -> export (ONNX, TorchScript, ExportedProgram) and verify -> latency of unmerged, folded and base
forward passes as ratios to base.  Exit status 0 only if every verification passed.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxlora
from fxlora import export, zoo

VOCAB = 256
SEQ = 32
RULES = [
    fxlora.Rule("transformer.h.*.attn.c_attn", r=8, alpha=16, enable_lora=[True, False, True]),
    fxlora.Rule("transformer.h.*.mlp.c_fc", r=8, alpha=16),
    fxlora.Rule("transformer.h.*.mlp.c_proj", r=8, alpha=16),
]


def _batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that count up in steps of 3 modulo the vocabulary: learn to predict the next token."""
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    seq = (start + 3 * torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def _bar(done: int, total: int, loss: float, width: int = 30) -> str:
    filled = int(width * done / total)
    return f"\r  [{'#' * filled}{'.' * (width - filled)}] {done:4d}/{total}  loss {loss:7.4f}"


def _median_ms(fns: dict[str, object], x: torch.Tensor, repeats: int = 25) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm up
            fn(x)
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


class _Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failed.append(what)


def run_demo(steps: int = 120, out: str | None = None, onnx: bool = True, seed: int = 0) -> int:
    started = time.perf_counter()
    check = _Checks()
    torch.manual_seed(seed)
    workdir = Path(out) if out else Path(tempfile.mkdtemp(prefix="fxlora-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        base = zoo.gpt2_tiny().eval()
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        print(f"fxlora demo: {type(base).__name__} (GPT-2 style, 4 layers, d=128), task: continue x, x+3, x+6, ... mod {VOCAB}")

        print("\n[1/6] report: what the rules adapt, and what it costs")
        print(fxlora.report(base, RULES))

        print("\n[2/6] rewrite: LoRA branches added to the graph, everything else frozen")
        gm = fxlora.rewrite(base, RULES)
        trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
        total = sum(p.numel() for p in gm.parameters())
        sites = fxlora.graph_sites(gm)
        print(f"  {len(sites)} sites, {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)")
        gen = torch.Generator().manual_seed(seed)
        x_eval, y_eval = _batch(gen, 64)
        with torch.no_grad():
            check(torch.equal(gm(x_eval), base(x_eval)), "at init the rewritten model computes the base function")

        print(f"\n[3/6] train: AdamW, {steps} steps, batch 32")
        tty = sys.stdout.isatty()
        opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-3)
        gm.train()
        first = last = float("nan")
        for step in range(1, steps + 1):
            x, y = _batch(gen, 32)
            loss = F.cross_entropy(gm(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            first = loss.item() if step == 1 else first
            last = loss.item()
            if tty and (step % 5 == 0 or step == steps):
                print(_bar(step, steps, last), end="", flush=True)
            elif not tty and (step % 20 == 0 or step == steps):
                print(_bar(step, steps, last).lstrip("\r"), flush=True)
        if tty:
            print()
        gm.eval()
        with torch.no_grad():
            eval_loss = F.cross_entropy(gm(x_eval).flatten(0, 1), y_eval.flatten()).item()
            base_loss = F.cross_entropy(base(x_eval).flatten(0, 1), y_eval.flatten()).item()
            acc = (gm(x_eval).argmax(-1) == y_eval).float().mean().item()
            base_acc = (base(x_eval).argmax(-1) == y_eval).float().mean().item()
        print(f"  training loss {first:.3f} -> {last:.3f}")
        check(eval_loss < base_loss - 1.0, f"training lowered the held-out loss ({base_loss:.3f} -> {eval_loss:.3f})")
        check(acc > 0.9 > base_acc, f"next-token accuracy {100 * base_acc:.1f}% -> {100 * acc:.1f}%")
        same = all(torch.equal(v, base_state[k]) for k, v in base.state_dict().items())
        check(same and all(p.requires_grad for p in base.parameters()), "the base model is untouched (bits and flags)")

        print("\n[4/6] save the LoRA tensors only")
        ckpt = fxlora.save_lora(gm, workdir / "adapter.safetensors")
        model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        size = ckpt.stat().st_size
        print(f"  {ckpt.name}: {size / 1024:.1f} KiB vs the full model's {model_bytes / 1024**2:.2f} MiB "
              f"({model_bytes / size:.0f}x smaller)")

        print("\n[5/6] load it into a fresh rewrite of the base model")
        fresh = fxlora.rewrite(base, RULES).eval()
        fxlora.load_lora(fresh, ckpt)
        with torch.no_grad():
            check(torch.equal(fresh(x_eval), gm(x_eval)), "the reloaded adapter reproduces the trained outputs exactly")

        print("\n[6/6] fold, export and verify")
        folded = fxlora.fold(fresh).eval()
        base_graph = torch.fx.symbolic_trace(base)
        with torch.no_grad():
            diff = (folded(x_eval) - fresh(x_eval)).abs().max().item()
        check(diff < 1e-4, f"folded output equals the unmerged output (max |diff| {diff:.2e})")
        same_graph = [(n.op, n.target) for n in folded.graph.nodes] == [(n.op, n.target) for n in base_graph.graph.nodes]
        check(same_graph, f"folded graph is the base graph: {len(folded.graph.nodes)} nodes, no LoRA node left")
        example = (x_eval[:4],)
        try:
            export.to_torchscript(folded, example, workdir / "folded.torchscript.pt")
            check(True, "TorchScript file saved, reloaded and verified")
        except fxlora.FxLoraError as e:
            check(False, f"TorchScript export: {e}")
        try:
            export.to_exported_program(folded, example, workdir / "folded.pt2")
            check(True, "torch.export program saved, reloaded and verified")
        except fxlora.FxLoraError as e:
            check(False, f"torch.export: {e}")
        if onnx:
            try:
                export.to_onnx(folded, example, workdir / "folded.onnx")
                export.to_onnx(base_graph, example, workdir / "base.onnx")
                ops_f = export.onnx_op_counts(workdir / "folded.onnx")
                ops_b = export.onnx_op_counts(workdir / "base.onnx")
                check(True, "ONNX model verified in onnxruntime")
                check(ops_f == ops_b, f"ONNX operator count equals the base model's ({sum(ops_f.values())} vs {sum(ops_b.values())})")
            except fxlora.FxLoraError as e:
                check(False, f"ONNX export: {e}")
        else:
            print("  skip ONNX export (--no-onnx)")

        x_bench = torch.randint(0, VOCAB, (8, 64))
        unmerged = fxlora.rewrite(base, RULES).eval()
        fxlora.load_lora(unmerged, ckpt)
        ms = _median_ms({"base": base_graph, "folded": folded, "unmerged": unmerged}, x_bench)
        print(f"  latency (batch 8 x 64 tokens, median of 25 interleaved runs): base {ms['base']:.2f} ms; "
              f"folded {ms['folded'] / ms['base']:.2f}x base; unmerged {ms['unmerged'] / ms['base']:.2f}x base")
        if out:
            print(f"  files kept in {workdir}")
    except fxlora.FxLoraError as e:
        check(False, f"{type(e).__name__}: {e}")
    finally:
        if not out:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    if check.failed:
        text = f"fxlora demo: {len(check.failed)} check(s) FAILED in {elapsed:.0f} s: {'; '.join(check.failed)}"
        print(flush=True)  # the blank line goes with the output; the error is one line on stderr
        print(" | ".join(line.strip() for line in text.splitlines() if line.strip()), file=sys.stderr)
        return 1
    print(f"\nfxlora demo: every check passed in {elapsed:.0f} s")
    return 0
