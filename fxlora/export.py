"""Export a folded model and prove the artifact computes what the folded module computes.

Each exporter writes the artifact (atomically: a temporary file, then a rename), loads it back in its
own runtime, and compares it with the folded module: the outputs on ``example_inputs`` and, for
TorchScript, every tensor of the state dict.  A difference above tolerance raises
:class:`ExportError` with the largest difference found.

* :func:`to_exported_program`: ``torch.export`` + ``torch.export.save``, the format torch recommends;
* :func:`to_onnx`: ``torch.onnx.export`` (the ``torch.export``-based exporter), checked in onnxruntime;
* :func:`to_torchscript`: ``torch.jit.script`` (falling back to ``torch.jit.trace`` on
  ``example_inputs`` when the graph is not scriptable), for runtimes that still load TorchScript.

All three take ``(module, example_inputs, path)`` (torch.onnx.export's order) and return an
:class:`Exported`: the path, the artifact loaded back in its runtime, and the largest difference found.

Pass the module returned by :func:`fxlora.fold`: exporting a module that still has LoRA branches is
refused, since the point is a plain graph with no extra operators.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ExportError
from .provenance import graph_sites

__all__ = ["ExportError", "Exported", "to_torchscript", "to_onnx", "to_exported_program", "onnx_op_counts", "compare"]


@dataclass(frozen=True)
class Exported:
    """What an exporter wrote and checked."""

    path: Path  # the artifact's file
    artifact: Any  # loaded back in its runtime: ExportedProgram, ScriptModule or onnxruntime.InferenceSession
    max_abs_diff: float  # largest absolute difference of its outputs from the folded module's


_TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-8), torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 1e-2)}


def _tolerance(t: torch.Tensor, atol: float | None, rtol: float | None) -> tuple[float, float]:
    a, r = _TOLERANCE.get(t.dtype, (0.0, 0.0))
    return (a if atol is None else atol), (r if rtol is None else rtol)


def _check_module(module: nn.Module, what: str) -> None:
    if not isinstance(module, nn.Module):
        raise ExportError(f"{what} expects an nn.Module (the result of fxlora.fold), got {type(module).__name__}.")
    if isinstance(module, torch.fx.GraphModule) and graph_sites(module):
        raise ExportError(
            f"{what}: this module still has LoRA branches. Export the folded module: {what}(fxlora.fold(gm), ...)."
        )


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def compare(expected: Any, got: Any, what: str, atol: float | None = None, rtol: float | None = None) -> float:
    """Largest absolute difference between two (nested) outputs; raise ExportError above tolerance."""
    exp = _leaves(expected)
    act = [torch.as_tensor(t) for t in (got if isinstance(got, list) else _leaves(got))]
    if len(exp) != len(act):
        raise ExportError(f"{what}: the artifact returns {len(act)} tensors, the folded module {len(exp)}.")
    worst = 0.0
    for i, (e, a) in enumerate(zip(exp, act)):
        if tuple(e.shape) != tuple(a.shape):
            raise ExportError(f"{what}: output {i} has shape {tuple(a.shape)}, the folded module gives {tuple(e.shape)}.")
        e64, a64 = e.detach().double().cpu(), a.detach().double().cpu()
        diff = float((e64 - a64).abs().max()) if e.numel() else 0.0
        worst = max(worst, diff)
        ta, tr = _tolerance(e, atol, rtol)
        if not torch.allclose(a64, e64, atol=ta, rtol=tr, equal_nan=True):
            raise ExportError(
                f"{what}: output {i} differs from the folded module by up to {diff:.3g} "
                f"(tolerance atol={ta:g}, rtol={tr:g} for {e.dtype})."
            )
    return worst


@contextlib.contextmanager
def _atomic(path: str | os.PathLike[str]) -> Iterator[str]:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp.", suffix=path.suffix or ".tmp", dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return module(*inputs)


def to_exported_program(
    folded: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> Exported:
    """``torch.export`` the folded module, save it with ``torch.export.save`` and verify the saved
    program (loaded back with ``torch.export.load``) against the module."""
    _check_module(folded, "to_exported_program")
    inputs = _as_tuple(example_inputs)
    expected = _run(folded, inputs)
    try:
        ep = torch.export.export(folded, inputs)
        with _atomic(path) as tmp:
            torch.export.save(ep, tmp)
        loaded = torch.export.load(str(path))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export failed: {type(e).__name__}: {e}") from e
    diff = compare(expected, _run(loaded.module(), inputs), "exported program", atol, rtol)
    return Exported(Path(path), loaded, diff)


def to_torchscript(
    folded: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> Exported:
    """Save the folded module as TorchScript and verify the saved file: every state-dict tensor, and the
    outputs on ``example_inputs`` unless it is None.  ``torch.jit.script`` is tried first; a graph it
    cannot compile is traced on ``example_inputs`` instead (so give them for such graphs)."""
    if isinstance(example_inputs, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
        raise ExportError(
            "to_torchscript takes (module, example_inputs, path), like the other exporters: "
            "to_torchscript(folded, (x,), 'model.pt')."
        )
    _check_module(folded, "to_torchscript")
    inputs = None if example_inputs is None else _as_tuple(example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in new torch; it still works
        try:
            scripted = torch.jit.script(folded)
        except Exception as script_error:  # noqa: BLE001
            if inputs is None:
                raise ExportError(
                    f"torch.jit.script cannot compile this graph ({type(script_error).__name__}: "
                    f"{str(script_error).splitlines()[0]}); pass example_inputs to trace it instead."
                ) from script_error
            try:
                scripted = torch.jit.trace(folded, inputs, check_trace=False)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"torch.jit.trace failed: {type(e).__name__}: {e}") from e
        with _atomic(path) as tmp:
            scripted.save(tmp)
        loaded = torch.jit.load(str(path))
    expected_state = folded.state_dict()
    loaded_state = loaded.state_dict()
    missing = [k for k in expected_state if k not in loaded_state]
    if missing:
        raise ExportError(f"TorchScript file lacks tensors: {', '.join(missing[:5])}.")
    for key, value in expected_state.items():
        if not torch.equal(value, loaded_state[key]):
            diff = float((value.double() - loaded_state[key].double()).abs().max())
            raise ExportError(f"TorchScript tensor '{key}' differs from the folded module by up to {diff:.3g}.")
    diff = 0.0
    if inputs is not None:
        diff = compare(_run(folded, inputs), _run(loaded, inputs), "TorchScript module", atol, rtol)
    return Exported(Path(path), loaded, diff)


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the onnx, onnxscript and onnxruntime packages ({e.name} is missing): "
            "pip install 'fxlora[onnx]'."
        ) from None
    return onnx, onnxruntime


@contextlib.contextmanager
def _quiet_onnx_logs() -> Iterator[None]:
    """The ONNX exporter logs warnings about optional operator libraries; keep them off the console."""
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def to_onnx(
    folded: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> Exported:
    """Export the folded module to ONNX and verify the file in onnxruntime on ``example_inputs``."""
    _check_module(folded, "to_onnx")
    onnx, ort = _require_onnx()
    inputs = _as_tuple(example_inputs)
    expected = _run(folded, inputs)
    try:
        with warnings.catch_warnings(), _quiet_onnx_logs(), _atomic(path) as tmp:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                folded, inputs, dynamo=True, input_names=list(input_names) if input_names else None,
                dynamic_shapes=dynamic_shapes, verbose=False,
            )
            program.save(tmp)
        onnx.checker.check_model(str(path))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    for meta, tensor in zip(session.get_inputs(), tensors):
        feeds[meta.name] = tensor.detach().cpu().numpy()
    got = session.run(None, feeds)
    diff = compare(expected, [torch.from_numpy(g) for g in got], "ONNX model in onnxruntime", atol, rtol)
    return Exported(Path(path), session, diff)


def onnx_op_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Operator type -> count in an ONNX file's main graph (the zero-overhead check)."""
    onnx, _ = _require_onnx()
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
