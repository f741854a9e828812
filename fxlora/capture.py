"""Capturing a model as a ``torch.fx`` graph without touching the model.

:func:`shadow_copy` gives a module tree made of *new* module and parameter objects over the *same*
parameter storage: fxlora can then register LoRA parameters, freeze or unfreeze, and swap weights on
its copy while the caller's model keeps its modules, ``requires_grad`` flags and state-dict keys, and
no weight is duplicated.  Buffers are cloned (they are small, and layers such as BatchNorm update
them in place during training, which must not leak into the caller's model).
"""

from __future__ import annotations

import copy
import os
import traceback
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Tracer

from .errors import TraceError

__all__ = ["shadow_copy", "trace", "copy_graph_module"]

_TORCH_DIR = os.path.dirname(torch.__file__)


def shadow_copy(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of ``module``'s tree with new module and ``Parameter`` objects that share storage.

    Shared submodules and tied parameters stay shared (one new object per original object).
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)
    memo[id(module)] = new
    # copy.copy shares the attribute values; give the copy its own registries and hook tables.
    for key, value in list(new.__dict__.items()):
        if isinstance(value, dict):
            new.__dict__[key] = copy.copy(value)
    new._parameters = {k: None if p is None else _shadow_param(p, memo) for k, p in module._parameters.items()}
    new._buffers = {k: None if b is None else _clone_buffer(b, memo) for k, b in module._buffers.items()}
    new._modules = {k: None if m is None else shadow_copy(m, memo) for k, m in module._modules.items()}
    return new


def _shadow_param(p: nn.Parameter, memo: dict[int, Any]) -> nn.Parameter:
    if id(p) not in memo:
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return memo[id(p)]


def _clone_buffer(b: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    if id(b) not in memo:
        memo[id(b)] = b.detach().clone()
    return memo[id(b)]


class _Tracer(Tracer):
    """``torch.fx.Tracer`` with extra leaf modules, by type or by qualified name."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self._leaf_types = leaf_types
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _split_leaves(leaf_modules: Iterable[type | str]) -> tuple[tuple[type, ...], frozenset[str]]:
    types, names = [], []
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            names.append(leaf)
        else:
            raise TraceError(f"leaf_modules entries must be nn.Module subclasses or qualified names, got {leaf!r}.")
    return tuple(types), frozenset(names)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch: the model code that failed to trace."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if not f.filename.endswith(os.path.join("fxlora", "capture.py"))]
    return frames[-1] if frames else None


def trace(
    model: nn.Module,
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Sequence[type | str] = (),
) -> tuple[nn.Module, Graph]:
    """Symbolically trace a shadow copy of ``model``; return ``(root, graph)``.

    ``root`` is the shadow copy (new module objects, shared parameter storage); build a
    ``GraphModule(root, graph)`` from the pair.  A ``GraphModule`` input is not traced again: its graph
    is copied, with every node's ``meta``.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module or a torch.fx.GraphModule, got {type(model).__name__}.")
    root = shadow_copy(model)
    if isinstance(model, GraphModule):
        return root, copy.deepcopy(model.graph)
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - every tracing failure becomes one TraceError
        frame = _user_frame(e)
        where = ""
        if frame is not None:
            where = f" The failing line is {frame.filename}:{frame.lineno} in {frame.name}(): {(frame.line or '').strip()!r}."
        raise TraceError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__}: {type(e).__name__}: {e}.{where} "
            "Symbolic tracing runs forward() on Proxy objects, so Python control flow on tensor values, "
            "calls into non-torch code and shape-dependent logic fail. Try: concrete_args={...} to fix the "
            "inputs that drive the branch; leaf_modules=[SubmoduleType or 'qualified.name'] to keep the "
            "offending submodule opaque; torch.fx.wrap('fn') for a free function; or capture the model "
            "yourself and pass the GraphModule to fxlora."
        ) from e
    return root, graph


def copy_graph_module(gm: GraphModule, cls: type[GraphModule] = GraphModule, **kwargs: Any) -> GraphModule:
    """A new ``cls`` over a shadow copy of ``gm``'s modules and a copy of its graph (meta included)."""
    root = shadow_copy(gm)
    return cls(root, copy.deepcopy(gm.graph), type(gm).__name__, **kwargs)
