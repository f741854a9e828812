"""Export a folded model and prove the artifact computes what the folded module computes.

Each exporter writes the artifact to a temporary file beside ``path``, loads it back in its own
runtime, compares it with the folded module (the outputs on the example inputs and, for TorchScript,
every tensor of the state dict), and only then renames it to ``path``.  Any failure, a difference above
tolerance included, raises :class:`ExportError` (with the largest difference found) and leaves ``path``
as it was: no file when there was none.

* :func:`to_exported_program`: ``torch.export`` + ``torch.export.save``, the format torch recommends;
* :func:`to_onnx`: ``torch.onnx.export`` (the ``torch.export``-based exporter), checked in onnxruntime;
* :func:`to_torchscript`: ``torch.jit.script``, or ``torch.jit.trace`` through a flat adapter when the
  graph is not scriptable (export-captured modules, structured inputs or outputs).

All three take ``(module, example_inputs, path, *, example_kwargs=None, ...)``: positional example
inputs (a tuple, or one tensor) and keyword ones, so a Hugging Face model folded by fxlora exports as
it is called (``to_onnx(folded, (ids,), "m.onnx", example_kwargs={"attention_mask": mask})``).  Outputs
may be tensors, tuples, dicts or Hugging Face ``ModelOutput`` objects: they are compared leaf by leaf
in pytree order, and the ONNX outputs are named after their keys (``logits``,
``encoder_last_hidden_state``).  Each returns an :class:`Exported`: the path, the artifact loaded back in
its runtime, and the largest difference found.

Pass the module returned by :func:`fxlora.fold`: exporting a module that still has LoRA branches is
refused, since the point is a plain graph with no extra operators.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
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
    """What an exporter wrote and checked.

    ``input_names`` and ``output_names`` describe the artifact's flat interface where it has one (ONNX;
    TorchScript traced through the flat adapter): the tensors it takes and returns, in order, named after
    the arguments and output keys of the folded module.
    """

    path: Path  # the artifact's file
    artifact: Any  # loaded back in its runtime: ExportedProgram, ScriptModule or onnxruntime.InferenceSession
    max_abs_diff: float  # largest absolute difference of its outputs from the folded module's
    input_names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None


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
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _check_tolerance(atol: float | None, rtol: float | None, what: str) -> None:
    for value in (atol, rtol):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise ExportError(f"{what}: atol and rtol must be non-negative numbers (or None for the dtype's defaults), got atol={atol!r}, rtol={rtol!r}.")


def _as_kwargs(example_kwargs: Any, what: str) -> dict[str, Any]:
    if example_kwargs is None:
        return {}
    if not isinstance(example_kwargs, Mapping) or not all(isinstance(k, str) for k in example_kwargs):
        raise ExportError(f"{what}: example_kwargs must be a dict of argument name -> value, got {type(example_kwargs).__name__}.")
    return dict(example_kwargs)


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _leaf_names(out: Any) -> list[str]:
    """Names of ``out``'s tensor leaves from their pytree key paths (``logits``, ``text_model_output.pooler_output``)."""
    if isinstance(out, torch.Tensor):
        return ["output"]
    names = []
    for path, leaf in pytree.tree_flatten_with_path(out)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        name = ".".join(re.sub(r"[\[\]'\".]", "", str(k)) or "x" for k in path) or "output"
        name = re.sub(r"[^0-9A-Za-z_.]", "_", name)
        names.append(name if not name[0].isdigit() else f"output_{name}")
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


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
def _staged(path: str | os.PathLike[str], what: str) -> Iterator[str]:
    """A temporary file beside ``path``: the body writes and verifies it; it becomes ``path`` only when the
    body succeeds.  Any failure is an :class:`ExportError` and leaves ``path`` as it was."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{what}: the folder of '{path}' does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp.", suffix=path.suffix or ".tmp", dir=parent)
    except OSError as e:
        raise ExportError(f"{what}: cannot write in '{parent}': {e}.") from e
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - every exporter failure becomes one ExportError
        raise ExportError(f"{what} failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from e
    finally:
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _run(module: Any, inputs: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> Any:
    try:
        with torch.no_grad():
            return module(*inputs, **kwargs)
    except Exception as e:  # noqa: BLE001 - the inputs do not fit the module: say so as an ExportError
        raise ExportError(
            f"{what}: running the module on the example inputs failed ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}). Give example_inputs (positional) and "
            "example_kwargs (keyword) as the module is called."
        ) from e


def _checked_call(
    folded: nn.Module, example_inputs: Any, example_kwargs: Any, atol: float | None, rtol: float | None, what: str
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """The exporter's arguments checked, and ``(inputs, kwargs, output)`` of the folded module's example call."""
    _check_module(folded, what)
    _check_tolerance(atol, rtol, what)
    inputs, kwargs = _as_tuple(example_inputs), _as_kwargs(example_kwargs, what)
    return inputs, kwargs, _run(folded, inputs, kwargs, what)


def _traceable(module: nn.Module) -> nn.Module:
    """``module`` as torch.export should see it.  torch.export runs a ``GraphModule`` through an FX
    interpreter, fed with the flattened call, which skips its generated ``forward`` (and with it the
    calling convention fxlora gives captured models, :mod:`fxlora.calling`); a plain module sharing its
    submodules, parameters and buffers (same names) and running the same ``forward`` is traced instead."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    shell_type = type(type(module).__name__, (nn.Module,), {"forward": type(module).forward})
    shell = nn.Module.__new__(shell_type)
    shell.__dict__.update(module.__dict__)
    return shell


def to_exported_program(
    folded: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> Exported:
    """``torch.export`` the folded module, save it with ``torch.export.save`` and verify the saved
    program (loaded back with ``torch.export.load``) against the module.  The program is called as it
    was exported (``program.module()(*example_inputs, **example_kwargs)``)."""
    what = "to_exported_program"
    inputs, kwargs, expected = _checked_call(folded, example_inputs, example_kwargs, atol, rtol, what)
    with _staged(path, what) as tmp:
        ep = torch.export.export(_traceable(folded), inputs, kwargs, dynamic_shapes=dynamic_shapes)
        torch.export.save(ep, tmp)
        loaded = torch.export.load(tmp)
        diff = compare(expected, _run(loaded.module(), inputs, kwargs, "the exported program"), "exported program", atol, rtol)
    return Exported(Path(path), loaded, diff)


class _FlatAdapter(nn.Module):
    """Calls ``module`` with the example call's structure rebuilt from flat tensors (non-tensor arguments
    fixed to their example values) and returns the output's tensors as a tuple: what ``torch.jit.trace``
    can record for modules with keyword, structured or constant inputs and dict / ModelOutput outputs."""

    def __init__(self, module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.module = module
        leaves, self._spec = pytree.tree_flatten((inputs, kwargs))
        self._is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        self._constants = [None if t else x for x, t in zip(leaves, self._is_tensor)]

    def flat_inputs(self, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return tuple(x for x in pytree.tree_leaves((inputs, kwargs)) if isinstance(x, torch.Tensor))

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(tensors)
        leaves = [next(it) if t else c for t, c in zip(self._is_tensor, self._constants)]
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return tuple(_leaves(self.module(*args, **kwargs)))


def _input_names(module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Names of the tensors of a call, in pytree order of ``(inputs, kwargs)``, from ``forward``'s signature."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        names = []
    out = []
    for i, value in enumerate(inputs):
        base = names[i] if i < len(names) else f"input_{i}"
        n = sum(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value))
        out += [base] if n == 1 and isinstance(value, torch.Tensor) else [f"{base}_{j}" for j in range(n)]
    for key, value in kwargs.items():
        n = sum(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value))
        out += [key] if isinstance(value, torch.Tensor) else [f"{key}_{j}" for j in range(n)]
    return out


def to_torchscript(
    folded: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> Exported:
    """Save the folded module as TorchScript and verify the saved file: every state-dict tensor, and the
    outputs on the example inputs unless there are none.

    ``torch.jit.script`` is tried first (the saved module is called like the folded one).  A module it
    cannot compile (a graph module captured with torch.export, keyword or structured inputs, dict or
    ``ModelOutput`` outputs) is traced on the example inputs through a flat adapter: the saved module
    then takes the example call's tensors positionally (in the order of ``(example_inputs,
    example_kwargs)``; non-tensor arguments are fixed to their example values) and returns the output's
    tensors as a tuple in pytree order (``Exported.input_names`` / ``output_names`` say which is which).
    """
    what = "to_torchscript"
    if isinstance(example_inputs, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
        raise ExportError(
            "to_torchscript takes (module, example_inputs, path), like the other exporters: "
            "to_torchscript(folded, (x,), 'model.pt')."
        )
    _check_module(folded, what)
    _check_tolerance(atol, rtol, what)
    kwargs = _as_kwargs(example_kwargs, what)
    inputs = None if example_inputs is None and not kwargs else _as_tuple(example_inputs)
    expected = None if inputs is None else _run(folded, inputs, kwargs, what)
    prefix, names = "", (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in new torch; it still works
        plain_call = not kwargs and isinstance(expected, (torch.Tensor, tuple)) and all(isinstance(x, torch.Tensor) for x in inputs or ())
        scripted = None
        script_error: Exception | None = None
        try:
            scripted = torch.jit.script(folded)
        except Exception as e:  # noqa: BLE001 - traced below
            script_error = e
        if scripted is not None and inputs is not None and not plain_call:
            scripted = None  # scripting worked but the call is structured: trace it flat, as documented
        if scripted is None:
            if inputs is None:
                raise ExportError(
                    f"torch.jit.script cannot compile this graph ({type(script_error).__name__}: "
                    f"{str(script_error).splitlines()[0]}); pass example_inputs to trace it instead."
                ) from script_error
            if plain_call:
                target: nn.Module = folded
                trace_inputs: tuple[Any, ...] = inputs
            else:
                target = _FlatAdapter(folded, inputs, kwargs)
                trace_inputs = target.flat_inputs(inputs, kwargs)
                prefix = "module."
                names = (tuple(_input_names(folded, inputs, kwargs)), tuple(_leaf_names(expected)))
            try:
                scripted = torch.jit.trace(target, trace_inputs, check_trace=False, strict=False)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"torch.jit.trace failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
        with _staged(path, what) as tmp:
            scripted.save(tmp)
            loaded = torch.jit.load(tmp)
            expected_state = folded.state_dict()
            loaded_state = {k[len(prefix):]: v for k, v in loaded.state_dict().items() if k.startswith(prefix)}
            missing = [k for k in expected_state if k not in loaded_state]
            if missing:
                raise ExportError(f"TorchScript file lacks tensors: {', '.join(missing[:5])}.")
            for key, value in expected_state.items():
                if not torch.equal(value, loaded_state[key]):
                    diff = float((value.double() - loaded_state[key].double()).abs().max())
                    raise ExportError(f"TorchScript tensor '{key}' differs from the folded module by up to {diff:.3g}.")
            diff = 0.0
            if inputs is not None:
                call = (inputs, {}) if not prefix else (_FlatAdapter(folded, inputs, kwargs).flat_inputs(inputs, kwargs), {})
                got = _run(loaded, call[0], call[1], "the TorchScript module")
                diff = compare(expected, list(got) if prefix else got, "TorchScript module", atol, rtol)
    return Exported(Path(path), loaded, diff, *names)


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


def _grouped_mm_rows(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """A grouped matmul written with ops ONNX has: row ``i`` (rows sorted by group, ``offs`` the cumulative
    row counts) times ``weight[group of i]`` (``(groups, in, out)``); rows past the last offset give zeros.
    Like transformers' ``batched_mm`` experts it gathers one ``(in, out)`` matrix per row."""
    rows = torch.arange(input.shape[0], device=input.device)
    group = (rows.unsqueeze(1) >= offs.unsqueeze(0)).sum(1)
    valid = (group < weight.shape[0]).unsqueeze(1)
    out = torch.bmm(input.unsqueeze(1), weight[group.clamp(max=weight.shape[0] - 1)]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


def _onnx_decompositions() -> dict[Any, Any]:
    """Ops that the ONNX exporter cannot translate, written with ops it can: transformers' MoE grouped
    matmuls (its ``grouped_mm_fallback`` custom op, used under torch.export in fp32, and
    ``aten._grouped_mm``)."""
    table: dict[Any, Any] = {}
    fallback = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if fallback is not None:
        table[fallback.default] = _grouped_mm_rows
    if hasattr(torch.ops.aten, "_grouped_mm"):

        def grouped(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
            if offs is None or mat_a.dim() != 2 or mat_b.dim() != 3:
                raise NotImplementedError("fxlora decomposes the 2-D x 3-D grouped matmul with offsets only")
            out = _grouped_mm_rows(mat_a, mat_b, offs)
            out = out if bias is None else out + bias
            return out if out_dtype is None else out.to(out_dtype)

        table[torch.ops.aten._grouped_mm.default] = grouped
    return table


def to_onnx(
    folded: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    optimize: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> Exported:
    """Export the folded module to ONNX and verify the file in onnxruntime on the example inputs.

    The ONNX graph takes the call's tensors (non-tensor arguments are fixed to their example values) and
    returns the output's tensors in pytree order, named after their keys for dict and ``ModelOutput``
    outputs.  ``optimize`` is torch.onnx's graph optimisation (off: a faster export, a larger graph).
    Grouped matmuls that ONNX has no operator for (transformers' MoE ``grouped_mm_fallback`` and
    ``aten._grouped_mm``) are written with a per-row gather and ``bmm`` (as transformers' ``batched_mm``
    experts run) before the translation."""
    what = "to_onnx"
    onnx, ort = _require_onnx()
    inputs, kwargs, expected = _checked_call(folded, example_inputs, example_kwargs, atol, rtol, what)
    output_names = _leaf_names(expected) if not isinstance(expected, (torch.Tensor, tuple, list)) else None
    flat = [t for t in pytree.tree_leaves((inputs, kwargs)) if isinstance(t, torch.Tensor)]
    named = dict(zip(_input_names(folded, inputs, kwargs), flat))
    with warnings.catch_warnings(), _quiet_onnx_logs(), _staged(path, what) as tmp:
        warnings.simplefilter("ignore")
        ep = torch.export.export(_traceable(folded), inputs, kwargs, dynamic_shapes=dynamic_shapes)
        table = _onnx_decompositions()
        used = {n.target for n in ep.graph.nodes if n.op == "call_function"} & set(table)
        if used:
            ep = ep.run_decompositions({op: table[op] for op in used})
        program = torch.onnx.export(
            ep, inputs, kwargs=kwargs or None, dynamo=True, input_names=list(input_names) if input_names else None,
            output_names=output_names, optimize=optimize, verbose=False,
        )
        program.save(tmp)
        onnx.checker.check_model(tmp)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: constant-folding notes are not failures
        session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        feeds, remaining = {}, [t for t in flat]
        for meta in session.get_inputs():
            tensor = named.get(meta.name)
            if tensor is None:
                tensor = remaining[0] if remaining else None
            if tensor is None:
                raise ExportError(f"{what}: the ONNX graph takes an input '{meta.name}' that the example call does not give.")
            remaining = [t for t in remaining if t is not tensor]
            feeds[meta.name] = tensor.detach().cpu().numpy()
        got = session.run(None, feeds)
        diff = compare(expected, [torch.from_numpy(g) for g in got], "ONNX model in onnxruntime", atol, rtol)
        names = (tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()))
    return Exported(Path(path), session, diff, *names)


def onnx_op_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Operator type -> count in an ONNX file's main graph (the zero-overhead check)."""
    onnx, _ = _require_onnx()
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"cannot read the ONNX file '{path}': {type(e).__name__}: {e}") from e
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
