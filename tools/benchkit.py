"""What the side-by-side benchmarks (``bench``, ``bench_serve``) share: a logger with elapsed time, a
time budget, interleaved timing with CUDA synchronised around every call, peak-memory probes, relative
errors and tolerances per dtype, rows that record their failure instead of ending the run, and markdown.

Nothing here is fxlora-specific; it is kept small so that a partial log of a GPU run is still useful.
"""

from __future__ import annotations

import contextlib
import gc
import io
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Relative (Frobenius-norm) error allowed against a reference, per dtype of the checked run: outputs
#: (logits, loss) and gradients.  A check allows at least this, and more where the dtype's noise floor
#: measured in the same run (the base model's own error, see :func:`allowed`) is higher: bf16 logits of
#: a random 4-layer model differ from fp32 by 1-2%, and the error grows with depth.
OUT_TOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 2e-2}
GRAD_TOL = {torch.float32: 1e-3, torch.float64: 1e-7, torch.bfloat16: 1e-1, torch.float16: 4e-2}


def allowed(dtype: torch.dtype, floor: float = 0.0) -> tuple[float, float]:
    """(output, gradient) tolerances for ``dtype``, given the noise ``floor`` of the same computation
    without the adapters: at least 3x (outputs) and 6x (gradients) the floor."""
    return max(OUT_TOL[dtype], 3 * floor), max(GRAD_TOL[dtype], 6 * floor)


class Log:
    """``log("...")`` prints with the seconds since start, flushed (a partial log of a killed run is useful)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)


class Budget:
    """Wall-clock budget of a run: optional sections start only while enough of it is left."""

    def __init__(self, log: Log, seconds: float | None) -> None:
        self.log, self.seconds = log, seconds

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.log.elapsed()

    def allows(self, what: str, needs: float = 0.0, notes: list[str] | None = None) -> bool:
        """Whether ``what`` (estimated to take ``needs`` seconds) may start; if not, log and note it."""
        if self.left() >= needs:
            return True
        msg = f"skipped {what}: {self.left():.0f} s of the {self.seconds:.0f} s budget left, it needs ~{needs:.0f} s"
        self.log(msg)
        if notes is not None:
            notes.append(msg)
        return False


class Errors(list):
    """Failures of single rows: ``with errors.guard("peft compiled fwd"): ...`` logs and records an
    exception instead of ending the run; ``guard`` yields a dict whose ``ok`` says whether the block ran."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[dict[str, bool]]:
        state = {"ok": False}
        try:
            yield state
            state["ok"] = True
        except Exception as e:  # noqa: BLE001 - a row's failure is reported, the run goes on
            short = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
            self.log(f"FAILED {what}: {short}")
            traceback.print_exc(limit=6, file=sys.stdout)
            sys.stdout.flush()
            self.append({"row": what, "error": short})
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cuda_graphed(fn: Callable[[], Any], device: str | torch.device, warmup: int = 2) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph (after ``warmup`` calls on a side stream, as torch.cuda.graphs
    recommends): the returned function replays it and returns the output of the captured call, whose
    tensors the next replay overwrites.  ``fn`` must read fixed input tensors and make no host sync."""
    device = torch.device(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    replay.graph = graph  # type: ignore[attr-defined]  # the graph lives as long as the function
    return replay


def timed(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Seconds of one call of ``fn``, CUDA synchronised before and after."""
    return _timed(fn, device)[0]


def _alloc_counts(device: str | torch.device) -> dict[str, int]:
    """The CUDA caching allocator's device allocations, frees and retries so far (zeros off CUDA), and
    Python's garbage collections so far."""
    import gc

    keys = ("num_device_alloc", "num_device_free", "num_alloc_retries")
    out = dict.fromkeys(keys, 0)
    if torch.device(device).type == "cuda":
        stats = torch.cuda.memory_stats(device)
        out = {k: int(stats.get(k, 0)) for k in keys}
    out["gc_collections"] = sum(g["collections"] for g in gc.get_stats())
    return out


def _timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, float]:
    """Seconds of one call of ``fn``, CUDA synchronised before and after, and seconds until it returned
    (the host's share: on a GPU, close to the whole when the call is bound by launching kernels)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    sync(device)
    return time.perf_counter() - t0, t1 - t0


def interleave(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    device: str | torch.device,
    errors: Errors,
    *,
    warmup: int = 1,
    label: str = "",
    host: dict[str, float] | None = None,
    allocs: dict[str, dict[str, int]] | None = None,
) -> dict[str, float]:
    """Median milliseconds of each function, timed in interleaved rounds after ``warmup`` untimed calls
    each.  Each round starts one function later (a b c, b c a, c a b, ...), so that no function always
    runs after the same one (a slow neighbour's allocator or clock state would otherwise be charged to
    it).  A function that raises is reported and left out.  ``host``, when given, receives each
    function's median milliseconds until it returned, before the device finished; ``allocs`` the CUDA
    caching allocator's device allocations, frees and retries, and Python's garbage collections, during
    each function's timed calls (read outside the timed region; a function that allocates device memory
    on every call pays a ``cudaMalloc`` each time)."""
    live = dict(fns)
    for name, fn in list(live.items()):
        with errors.guard(f"{label}{name} (warm-up)") as ok:
            for _ in range(warmup):
                fn()
        if not ok["ok"]:
            del live[name]
    times: dict[str, list[float]] = {k: [] for k in live}
    issued: dict[str, list[float]] = {k: [] for k in live}
    for round_ in range(repeats):
        order = list(live.items())
        shift = round_ % max(len(order), 1)
        for name, fn in order[shift:] + order[:shift]:
            with errors.guard(f"{label}{name}") as ok:
                before = _alloc_counts(device) if allocs is not None else None
                total, returned = _timed(fn, device)
                times[name].append(total)
                issued[name].append(returned)
                if before is not None:
                    after = _alloc_counts(device)
                    row = allocs.setdefault(name, dict.fromkeys(before, 0))
                    for key in before:
                        row[key] += after[key] - before[key]
            if not ok["ok"]:
                del live[name]
                times.pop(name)
    if host is not None:
        host.update({k: statistics.median(issued[k]) * 1e3 for k, v in times.items() if v})
    return {k: statistics.median(v) * 1e3 for k, v in times.items() if v}


def peak_bytes(fn: Callable[[], Any], device: str | torch.device) -> int | None:
    """CUDA memory one call of ``fn`` allocates above what was allocated before it (None off CUDA)."""
    if torch.device(device).type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def module_bytes(*modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct parameters and buffers of ``modules`` (shared storage counted once), plus the
    optimizer's state tensors."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            add(t)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.numel() > 1:
                    add(v)
    return total


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float32 (float64 for float64)."""
    dt = torch.float64 if ref.dtype == torch.float64 else torch.float32
    g, r = got.detach().to(dt), ref.detach().to(dt)
    return float((g - r).norm() / r.norm().clamp_min(1e-30))


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def versions() -> dict[str, str | None]:
    """Versions of torch and the peers (None where one does not import)."""
    import importlib.metadata
    import importlib.util

    out: dict[str, str | None] = {"torch": torch.__version__}
    for name in ("transformers", "peft", "loralib", "triton", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name) if importlib.util.find_spec(name) else None
        except (importlib.metadata.PackageNotFoundError, ValueError):
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------------
# The models both benchmarks use: transformers decoders built from configs, random weights
# --------------------------------------------------------------------------------------------------

MODELS = ("gpt2-medium", "llama-1.2b")


def build_model(name: str, small: bool, device: str | torch.device, dtype: torch.dtype, layers: int | None = None):
    """A transformers decoder with random weights (seed 0), ``dtype`` on ``device``, eval mode, no dropout.

    ``gpt2-medium``: GPT2LMHeadModel, 1024 wide, 24 layers, 16 heads, vocab 50257 (fused qkv ``c_attn``,
    GPT-2's transposed Conv1D).  ``llama-1.2b``: LlamaForCausalLM, hidden 2048, 16 layers, 32 heads, 8 kv
    heads, intermediate 8192, vocab 128256, tied embeddings (Llama-3.2-1B's shape, 1.24B parameters).
    ``small``: 2 layers 64 wide, vocab 128, weights of std 0.2 (clear greedy maxima).  ``layers``
    overrides the depth.  Generation never stops early (no EOS), so that timed generations have equal length.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "gpt2-medium":
        size = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=128, initializer_range=0.2) if small \
            else dict(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257)
        if layers:
            size["n_layer"] = layers
        cfg = transformers.GPT2Config(**size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
        cls = transformers.GPT2LMHeadModel
    elif name == "llama-1.2b":
        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=128, initializer_range=0.2) if small \
            else dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=128256)
        if layers:
            size["num_hidden_layers"] = layers
        cfg = transformers.LlamaConfig(**size, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"unknown model {name!r}: use {', '.join(MODELS)}")
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hard_deadline(seconds: float | None, log: Log) -> None:
    """Once ``seconds`` after start have passed, raise ``TimeoutError`` in the main thread, once: the row
    running then (a compile that takes too long, say) fails and is reported, the exhausted budget skips the
    sections after it, and the results are still written.  No-op for None or where SIGALRM does not exist."""
    import signal

    if seconds is None or not hasattr(signal, "SIGALRM"):
        return

    def handler(signum, frame):  # noqa: ARG001
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise TimeoutError(f"hard time limit of {seconds:.0f} s reached")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds - log.elapsed()))


def run_models(
    names: list[str],
    run_one: Callable[[str, dict[str, Any], Callable[[Any], None]], None],
    write: Callable[[list[dict[str, Any]], str | None, bool], None],
    *,
    device: str,
    small: bool,
    errors: Errors,
    budget: Budget,
    notes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run ``run_one(name, res, checkpoint)`` for each model the budget allows, each a row of its own
    (a failure is recorded in ``errors`` and the run goes on), and return the results.  ``checkpoint``
    writes the results so far through ``write(results, None, True)`` (partial), so that a run killed
    later still leaves them."""
    results: list[dict[str, Any]] = []

    def checkpoint(_: Any = None) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            write(results, None, True)

    for name in names:
        if not budget.allows(f"model {name}", needs=30 if small else 60, notes=notes):
            errors.append({"row": name, "error": "skipped: time budget"})
            continue
        res: dict[str, Any] = {"model": name}
        results.append(res)
        with errors.guard(f"model {name}"):
            run_one(name, res, checkpoint)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def finish(results: list[dict[str, Any]], text: str, errors: Errors, write: Callable[..., None], log: Log) -> int:
    """The end of a run: the failures listed, the results file written (not partial), 1 if any row failed."""
    if errors:
        print("\nfailures:\n" + "\n".join(f"- {e['row']}: {e['error']}" for e in errors), flush=True)
    write(results, text, False)
    log(f"done in {log.elapsed():.0f} s")
    return 1 if errors else 0


def start(device: str, budget_s: float | None, grace_s: float) -> tuple[Log, Errors, Budget, str]:
    """The log, the row errors and the time budget of a run (killed ``grace_s`` after the budget), and the
    device's name."""
    log = Log()
    hard_deadline(None if budget_s is None else budget_s + grace_s, log)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    return log, Errors(log), Budget(log, budget_s), name
