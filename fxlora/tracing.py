"""Capturing a model as a ``torch.fx`` graph without touching the model: symbolic tracing and torch.export.

:func:`shadow_copy` gives a module tree made of *new* module and parameter objects over the *same*
parameter storage: fxlora can then register LoRA parameters, freeze or unfreeze, and swap weights on
its copy while the caller's model keeps its modules, ``requires_grad`` flags and state-dict keys, and
no weight is duplicated.  Buffers are cloned (they are small, and layers such as BatchNorm update
them in place during training, which must not leak into the caller's model).
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import gc
import operator
import os
import threading
import traceback
from collections import OrderedDict
import weakref
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node, Tracer
from torch.fx.graph_module import _copy_attr
from torch.fx.node import map_arg
from torch.fx.operator_schemas import get_signature_for_torch_op
from torch.fx.proxy import ParameterProxy
from torch.utils import _pytree as pytree

from . import calling
from .errors import TraceError
from .passes import causal_attention as causal_attention_pass
from .passes import make_mode_aware
from .passes.infra import create_node_again
from .sites import normalize_method_calls

__all__ = [
    "shadow_copy", "trace", "trace_graph_module", "copy_graph", "copy_graph_module", "build_graph_module", "code_later", "ensure_code",
    "gc_paused", "gc_as_before", "export_capture", "keep_state_keys", "NON_PERSISTENT_META", "GeneratedCode",
    "record_generated_code", "generated_code", "graph_module_tree", "keep_non_persistent", "shallow_copy",
]

#: ``gm.meta`` key: the buffers of a captured graph module that are not in the model's state dict
#: (non-persistent buffers, torch.export's lifted constants), kept out of ``gm.state_dict()`` in every copy.
NON_PERSISTENT_META = "fxlora_non_persistent"

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXLORA_DIR = os.path.dirname(__file__)


def shadow_copy(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A copy of ``module``'s tree with new module and ``Parameter`` objects that share storage.

    Shared submodules and tied parameters stay shared (one new object per original object).
    """
    memo = {} if memo is None else memo
    new = memo.get(id(module))
    if new is not None:
        return new
    new = shallow_copy(module)
    memo[id(module)] = new
    # copy.copy shares the attribute values; give the copy its own registries, hook tables and other
    # containers (``_non_persistent_buffers_set``: a buffer made non-persistent in the copy is not in the original)
    attrs = new.__dict__
    for key, value in attrs.items():
        if isinstance(value, dict) and key not in _REGISTRIES:
            attrs[key] = value.copy() if type(value) in _PLAIN_DICTS else copy.copy(value)
        elif type(value) in (set, list):
            attrs[key] = value.copy()
    registries = (
        {k: None if p is None else _shadow_param(p, memo) for k, p in module._parameters.items()},
        {k: None if b is None else _clone_buffer(b, memo) for k, b in module._buffers.items()},
        {k: None if m is None else shadow_copy(m, memo) for k, m in module._modules.items()},
    )
    plain = type(new).__setattr__ is nn.Module.__setattr__  # which stores a dict value as a plain attribute
    for name, registry in zip(_REGISTRIES, registries):
        if plain:
            attrs[name] = registry
        else:
            setattr(new, name, registry)
    return new


_PLAIN_DICTS = (dict, OrderedDict)  # copy.copy(d) is d.copy() for these
_REGISTRIES = ("_parameters", "_buffers", "_modules")  # made anew by shadow_copy


def _copies_like_module(cls: type) -> bool:
    """Whether ``copy.copy`` of a ``cls`` instance is what it is for ``nn.Module``: a new object whose
    ``__setstate__`` receives ``__getstate__()`` (no class in the way overrides copying or pickling)."""
    known = _MODULE_LIKE.get(cls)
    if known is None:
        known = _MODULE_LIKE[cls] = all(
            getattr(cls, k) is getattr(nn.Module, k) for k in ("__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")
        ) and not hasattr(cls, "__copy__")
    return known


_MODULE_LIKE: dict[type, bool] = {}


def shallow_copy(module: nn.Module) -> nn.Module:
    """``copy.copy(module)``, without ``copy``'s generic reduce protocol for the usual module classes
    (what ``copy.copy`` does for them, done directly: a tenth of the time)."""
    cls = type(module)
    if cls in copyreg.dispatch_table or not _copies_like_module(cls):
        return copy.copy(module)
    new = cls.__new__(cls)
    new.__setstate__(module.__getstate__())
    return new


def _shadow_graph_module_root(gm: GraphModule) -> nn.Module:
    """A plain container holding a shadow copy of everything ``gm``'s graph reads, to build a new
    ``GraphModule`` from (cheaper than ``copy.copy(gm)``, which generates and compiles code)."""
    memo: dict[int, Any] = {}
    root = nn.Module()
    root.training = gm.training
    root._modules = {k: None if m is None else shadow_copy(m, memo) for k, m in gm._modules.items()}
    root._parameters = {k: None if p is None else _shadow_param(p, memo) for k, p in gm._parameters.items()}
    root._buffers = {k: None if b is None else _clone_buffer(b, memo) for k, b in gm._buffers.items()}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            top = node.target.split(".")[0]
            if top not in root._modules and top not in root._parameters and top not in root._buffers:
                object.__setattr__(root, top, getattr(gm, top))  # plain attributes (tensor constants)
    return root


def _shadow_param(p: nn.Parameter, memo: dict[int, Any]) -> nn.Parameter:
    if id(p) not in memo:
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    return memo[id(p)]


def _clone_buffer(b: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor:
    if id(b) not in memo:
        memo[id(b)] = b.detach().clone()
    return memo[id(b)]


class _Tracer(Tracer):
    """``torch.fx.Tracer`` with extra leaf modules, by type or by qualified name, and a parameter lookup
    in constant time.

    torch's ``Tracer.getattr`` finds the name of a parameter or buffer that a module reads
    (``self.weight`` in ``x @ self.weight``) by walking every parameter of the root, so tracing a model
    whose layers read their weights is quadratic in depth (a 768-layer model spent 90% of its rewrite
    there).  Here the names come from a table made once per traced root, with the same first-name-wins
    answer; a tensor the table lacks (one registered while tracing, or a plain tensor attribute) takes
    torch's own search.

    Constructible without arguments: a ``GraphModule`` keeps its tracer class and calls it with none when
    it is unpickled.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = tuple(leaf for leaf in leaves if isinstance(leaf, type))
        self._leaf_names = frozenset(leaf for leaf in leaves if isinstance(leaf, str))
        self._names_of: tuple[nn.Module, dict[int, Any], dict[int, Any]] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if module_qualified_name in self._leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._names_of is None or self._names_of[0] is not self.root:
            params: dict[int, tuple[str, torch.Tensor]] = {}
            buffers: dict[int, tuple[str, torch.Tensor]] = {}
            for n, p in self.root.named_parameters():
                params.setdefault(id(p), (n, p))
            for n, b in self.root.named_buffers():
                buffers.setdefault(id(b), (n, b))
            self._names_of = (self.root, params, buffers)
        _, params, buffers = self._names_of
        found = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if found is None and self.proxy_buffer_attributes:
            found = buffers.get(id(attr_val))
        if found is None or found[1] is not attr_val:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name = found[0]
        if name not in parameter_proxy_cache:  # as torch's search does once it has found the name
            factory = (lambda node: ParameterProxy(self, node, name, attr_val)) if self.param_shapes_constant else None
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]


def _failing_line(exc: BaseException) -> str:
    """A sentence naming the innermost traceback frame outside torch and fxlora (the model code that
    could not be captured), or "" when there is none."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_FXLORA_DIR)
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" The failing line is {f.filename}:{f.lineno} in {f.name}(): {(f.line or '').strip()!r}."


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
    if isinstance(model, GraphModule):
        root, graph, _ = trace_graph_module(model)
        return root, graph
    root = shadow_copy(model)
    tracer = _Tracer(leaf_modules)
    before = _module_state(root)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - every tracing failure becomes one TraceError
        raise TraceError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__}: {type(e).__name__}: {e}.{_failing_line(e)} "
            "Symbolic tracing runs forward() on Proxy objects, so Python control flow on tensor values, "
            "calls into non-torch code and shape-dependent logic fail. Try: concrete_args={...} to fix the "
            "inputs that drive the branch; leaf_modules=[SubmoduleType or 'qualified.name'] to keep the "
            "offending submodule opaque; torch.fx.wrap('fn') for a free function; or capture the model "
            "yourself and pass the GraphModule to fxlora."
        ) from e
    _check_state_unchanged(model, before, _module_state(root), "symbolic")
    _check_no_state_writes(model, root, graph)
    normalize_method_calls(graph)  # x.matmul(W.T) is a site like torch.matmul(x, W.T)
    return root, graph


def trace_graph_module(model: GraphModule) -> tuple[nn.Module, Graph, bool]:
    """:func:`trace` of a ``GraphModule``: ``(root, graph, changed)``, ``changed`` saying whether the copied
    graph was normalized (``normalize_method_calls`` rewrote some of its nodes), so that it no longer
    is, node for node, the graph of ``model``."""
    graph = copy_graph(model.graph)
    changed = normalize_method_calls(graph) > 0
    return _shadow_graph_module_root(model), graph, changed


def copy_graph(graph: Graph) -> Graph:
    """``copy.deepcopy(graph)``: the same nodes (names, ops, targets, arguments, types, a copy of each
    ``meta``) and a copy of its code generator, in half the time: ``Graph.node_copy`` hands each node's
    arguments to ``Graph.create_node``, which walks them again for raw symbolic values, checked when the
    graph was built (:func:`fxlora.passes.infra.create_node_again`)."""
    new = Graph(tracer_cls=graph._tracer_cls)
    copied: dict[Node, Node] = {}
    get = copied.__getitem__
    for node in graph.nodes:
        if node.op == "output":
            out = new.output(map_arg(node.args[0], get), type_expr=getattr(node, "type", None))
            _copy_meta(node, out)
            break
        made = create_node_again(new, node.op, node.target, map_arg(node.args, get), map_arg(node.kwargs, get), node.name, node.type)
        _copy_meta(node, made)
        copied[node] = made
    new._codegen = copy.deepcopy(graph._codegen)
    return new


def _copy_meta(node: Node, made: Node) -> None:
    if type(node.meta) is dict:
        made.meta.update(node.meta)  # made.meta is a new, empty dict
    else:
        made.meta = copy.copy(node.meta)


# --------------------------------------------------------------------------------------------- #
# State that forward() updates: what a capture would silently drop
# --------------------------------------------------------------------------------------------- #

_SCALARS = (bool, int, float, str, type(None))


def _module_state(root: nn.Module) -> dict[tuple[str, str], Any]:
    """Per module attribute: Python scalars by value, buffers and tensor attributes by (identity,
    version counter), and anything that is a ``torch.fx.Proxy`` (a traced value stored on the module)."""
    state: dict[tuple[str, str], Any] = {}
    for name, mod in root.named_modules():
        for attr, value in mod.__dict__.items():
            if attr.startswith("_") or attr == "training":
                continue
            if isinstance(value, _SCALARS):
                state[(name, attr)] = ("scalar", value)
            elif isinstance(value, torch.Tensor):
                state[(name, attr)] = ("tensor", id(value), value._version)
            elif isinstance(value, torch.fx.Proxy):
                state[(name, attr)] = ("proxy", id(value))
        for attr, value in mod._buffers.items():
            if value is not None:
                state[(name, attr)] = ("buffer", id(value), value._version)
    return state


def _check_state_unchanged(model: nn.Module, before: dict, after: dict, how: str) -> None:
    """Raise :class:`TraceError` when the capture ran a forward() that updated the module's state in a way
    the captured graph does not repeat: for symbolic tracing, a buffer updated in place or reassigned, or
    a Python attribute changed; for torch.export (which keeps buffer updates), a Python attribute."""
    changed = []
    for key, now in after.items():
        was = before.get(key)
        if now[0] == "proxy":
            changed.append((key, "buffer" if key in before and before[key][0] == "buffer" else "attribute", "assigned a traced value"))
        elif was is None:
            continue  # created during forward (a lazily built cache): nothing it held before can be lost
        elif now[0] == "scalar" and was != now:
            changed.append((key, "python", f"changed from {was[1]!r} to {now[1]!r}"))
        elif how == "symbolic" and now[0] in ("buffer", "tensor") and was != now:
            what = "reassigned" if was[1] != now[1] else "updated in place"
            changed.append((key, "buffer", what))
    if not changed:
        return
    (module, attr), kind, what = changed[0]
    name = f"{module}.{attr}" if module else attr
    others = f" (and {', '.join(f'{m}.{a}' if m else a for (m, a), _, _ in changed[1:4])})" if len(changed) > 1 else ""
    if kind == "python":
        raise TraceError(
            f"{type(model).__name__}.forward() changes the Python attribute '{name}'{others} ({what}) while it runs. A "
            "captured graph runs forward() once and bakes that value in, so the rewritten model would silently "
            f"differ from yours on the next call. Keep such state in a buffer updated in place (for a counter: "
            f"self.register_buffer('{attr}', torch.zeros((), dtype=torch.long)) and self.{attr} += 1) and capture with "
            "torch.export, which keeps buffer updates."
        )
    raise TraceError(
        f"{type(model).__name__}.forward() updates the buffer '{name}'{others} ({what}) while it runs. Symbolic "
        "tracing runs forward() once on stand-in values and drops such updates, so the captured graph would "
        "silently differ from your model. Capture with torch.export instead, which keeps buffer updates: pass "
        "example_inputs=(...) (capture='auto' then falls back to it) or capture='export'."
    )


_INPLACE_NAMES = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift", "matmul")
_INPLACE_OPERATORS = frozenset(getattr(operator, f"i{name}") for name in _INPLACE_NAMES) | {operator.setitem}
_ALIASING_ATTRS = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
#: Methods whose result may be their input itself or a view of it: views, and conversions that return
#: ``self`` when there is nothing to convert (``x.type_as(x)``, ``x.float()`` on a float32 tensor).
_MAY_RETURN_SELF = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "expand", "expand_as", "contiguous",
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long", "bool", "cpu", "cuda",
    "detach", "requires_grad_", "as_subclass",
})


def _schemas(node: Node) -> list[Any]:
    """The ATen schemas of a ``call_function`` or ``call_method`` node's op (every overload), or []."""
    if node.op == "call_method" and isinstance(node.target, str):
        packet = getattr(torch.ops.aten, node.target, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            return []
        return [getattr(packet, o)._schema for o in packet.overloads()]
    if node.op != "call_function":
        return []
    if isinstance(node.target, torch._ops.OpOverload):
        return [node.target._schema]
    try:
        found = get_signature_for_torch_op(node.target, return_schemas=True)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - an op torch has no schema for
        return []
    return list(found[1] or []) if isinstance(found, tuple) else []


def _written(node: Node) -> list[Any]:
    """The arguments that ``node`` writes into: ``self`` of an in-place method or function (``x.add_()``,
    ``x.copy_(y)``, ``x[i] = v``, ``x += y``), an ``out=`` argument, and any argument the op's schema
    marks as written (``Tensor(a!)``)."""
    written: list[Any] = []
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        if (name.endswith("_") and not name.startswith("_")) or name == "__setitem__" or (
            name.startswith("__i") and name.endswith("__") and name[3:-2] in _INPLACE_NAMES
        ):
            written.append(node.args[0] if node.args else None)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")):
            written.append(node.args[0] if node.args else None)
    else:
        return written
    if "out" in node.kwargs:
        written.append(node.kwargs["out"])
    for schema in _schemas(node):
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                if arg.kwarg_only or i >= len(node.args):
                    written.append(node.kwargs.get(arg.name))
                else:
                    written.append(node.args[i])
    return written


def _is_view(node: Node) -> bool:
    """Whether ``node``'s result may share memory with its first argument (a view of it: ``x.view()``,
    ``x[0]``, ``x.T``, ``x.transpose()``...), read from the op's schema where it has one."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _ALIASING_ATTRS
    if node.op == "call_function" and node.target is operator.getitem:
        return True
    if node.op == "call_method" and node.target in _MAY_RETURN_SELF:
        return True
    for schema in _schemas(node):
        returns = schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return True
    return False


def _storage_address(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage, or None where it has none to compare (meta and empty tensors,
    tensor subclasses without a storage of their own, such as torchao's quantized weights)."""
    if t.device.type == "meta" or not t.numel():
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _check_no_state_writes(model: nn.Module, root: nn.Module, graph: Graph) -> None:
    """Raise :class:`TraceError` when the traced graph writes in place into a buffer or parameter (or a view
    of one): ``s.ema.copy_(0.9 * s.ema + 0.1 * x.mean(0))`` records the copy_, but the ``0.9 * s.ema``
    it copies was computed once while tracing, on the buffer's value then, and is baked into the graph
    as a constant; the captured model would drift from yours from the second call."""
    storage: dict[int, tuple[str, str]] = {}  # storage address -> (kind, name) of a buffer or parameter
    for kind, named in (("parameter", root.named_parameters), ("buffer", root.named_buffers)):
        for name, t in named():
            address = _storage_address(t)
            if address is not None:
                storage.setdefault(address, (kind, name))
    for prefix, module in root.named_modules():  # plain tensor attributes (self.stats = torch.zeros(4))
        for attr, t in vars(module).items():
            if isinstance(t, torch.Tensor) and not attr.startswith("_"):
                address = _storage_address(t)
                if address is not None:
                    storage.setdefault(address, ("tensor attribute", f"{prefix}.{attr}" if prefix else attr))
    state: dict[Node, tuple[str, str]] = {}  # node -> (kind, name) of the buffer or parameter it aliases
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(node.target, str):
            value: Any = root
            for atom in node.target.split("."):
                value = getattr(value, atom, None)
            # a buffer, a parameter, or a tensor constant the tracer made of a view of one (s.ema.view(2, 2))
            found = storage.get(_storage_address(value)) if isinstance(value, torch.Tensor) else None
            if found is not None:
                state[node] = found
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        for target in pytree.tree_leaves(_written(node)):  # a list of tensors too (torch._foreach_copy_)
            if isinstance(target, Node) and target in state:
                kind, name = state[target]
                what = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
                raise TraceError(
                    f"{type(model).__name__}.forward() writes into the {kind} '{name}' in place ({what} at node "
                    f"'{node.name}': {node.format_node()}). Symbolic tracing records that write, but what it writes was "
                    f"partly computed once while tracing, from the {kind}'s value then, and is baked into the graph, "
                    "so the captured model would silently drift from yours from the second call. Capture with "
                    "torch.export instead, which keeps such updates: pass example_inputs=(...) (capture='auto' then "
                    "falls back to it) or capture='export'."
                )
        if node.args and isinstance(node.args[0], Node) and node.args[0] in state and _is_view(node):
            state[node] = state[node.args[0]]


def keep_state_keys(gm: GraphModule, model: nn.Module) -> None:
    """Give ``gm`` the state-dict keys of ``model``: buffers ``model.state_dict()`` lacks (non-persistent
    buffers, torch.export's lifted constants) become non-persistent in ``gm`` too, and are recorded in
    ``gm.meta`` so that every copy of ``gm`` keeps them so.  Then ``model.load_state_dict(fold(gm).state_dict())``
    loads with ``strict=True``."""
    keys = set(model.state_dict(keep_vars=True))  # the keys alone: no tensor detached for them
    names = sorted(n for n, _ in gm.named_buffers(remove_duplicate=False) if n not in keys)
    gm.meta[NON_PERSISTENT_META] = names
    keep_non_persistent(gm)


def keep_non_persistent(gm: GraphModule) -> None:
    """Make the buffers ``gm.meta`` records as not in the model's state dict non-persistent in ``gm``."""
    for name in getattr(gm, "meta", {}).get(NON_PERSISTENT_META, ()):
        owner, _, attr = name.rpartition(".")
        try:
            mod = gm.get_submodule(owner)
        except AttributeError:
            continue
        if attr in mod._buffers:
            mod._non_persistent_buffers_set.add(attr)


# --------------------------------------------------------------------------------------------- #
# The garbage collector, while fxlora builds graphs
# --------------------------------------------------------------------------------------------- #
#
# Tracing, copying and rewriting a graph allocates many objects (nodes, their arguments and metadata)
# and frees few; each full collection that these allocations trigger walks every object of the process,
# the model and every graph in it.  That was a quarter of the rewrite and of the first fold of a deep
# model.  fxlora's entry points pause the collector while they build graphs, as
# ``torch.distributed.checkpoint``'s ``get_state_dict`` does, and give it back as it was for the work that
# is not theirs (torch.export runs the model's code).

_gc_lock = threading.Lock()
_gc_state = {"pauses": 0, "was_enabled": False}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused in the block (nested blocks: until the outermost ends),
    then as it was.  Also a decorator."""
    with _gc_lock:
        if _gc_state["pauses"] == 0:
            _gc_state["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_state["pauses"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["pauses"] -= 1
            if _gc_state["pauses"] == 0 and _gc_state["was_enabled"]:
                gc.enable()


@contextlib.contextmanager
def gc_as_before() -> Iterator[None]:
    """Inside :func:`gc_paused`, the collector as it was before the pause, for the block."""
    resume = _gc_state["pauses"] > 0 and _gc_state["was_enabled"] and not gc.isenabled()
    if resume:
        gc.enable()
    try:
        yield
    finally:
        if resume and _gc_state["pauses"] > 0:
            gc.disable()


# --------------------------------------------------------------------------------------------- #
# Graph modules whose code is generated once
# --------------------------------------------------------------------------------------------- #
#
# GraphModule generates and compiles Python code from its graph when it is built and at every recompile();
# for a large graph that costs as much as the rest of a rewrite.  A module that a pass edits and recompiles
# before anyone runs it (a capture about to be rewritten, the copy a fold template is made from) is built
# *without code*: no ``code`` and no ``forward`` until :func:`ensure_code` or ``recompile()`` generates
# them, once, from the final graph.


def _without_code(gm: GraphModule) -> None:
    gm.__dict__.pop("_code", None)
    if "forward" in vars(type(gm)):  # each graph module has a class of its own, which holds its forward
        delattr(type(gm), "forward")


@contextlib.contextmanager
def code_later(gm: GraphModule) -> Iterator[GraphModule]:
    """Within the block ``gm.recompile()`` generates nothing; a module recompiled in the block leaves it
    without code (see above)."""
    asked: list[bool] = []
    gm.__dict__["recompile"] = lambda *args, **kwargs: asked.append(True)  # hides the class's method
    try:
        yield gm
    finally:
        del gm.__dict__["recompile"]
        if asked:
            _without_code(gm)


def build_graph_module(
    cls: type[GraphModule], root: Any, graph: Graph, class_name: str = "GraphModule", *, code: bool = True, **kwargs: Any
) -> GraphModule:
    """``cls(root, graph, class_name, **kwargs)``; with ``code=False`` built without code (see above): the
    caller recompiles it, or calls :func:`ensure_code`, before it is used."""
    if code:
        return cls(root, graph, class_name, **kwargs)
    out = cls.__new__(cls, root, graph, class_name, **kwargs)
    with code_later(out):
        out.__init__(root, graph, class_name, **kwargs)  # type: ignore[misc]
    return out


def ensure_code(gm: GraphModule) -> GraphModule:
    """``gm``, with its code generated if it has none (see above)."""
    if "_code" not in gm.__dict__:
        gm.recompile()
    return gm


class GeneratedCode(NamedTuple):
    """What ``GraphModule.recompile()`` generated for a graph: its source, the compiled ``forward`` (the
    function itself, before any wrapper), and the line map that goes with them."""

    code: str
    forward: Any
    lineno_map: Any
    prologue_start: int
    nodes: tuple[Any, ...]  # graph_fingerprint(graph) when it was generated


#: graph -> the code fxlora's graph modules generated from it, recorded by ``LoraGraphModule.recompile``
_GENERATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_generated_code(gm: GraphModule, forward: Any) -> None:
    """Record the code ``gm.recompile()`` has just generated from ``gm.graph`` (``forward``: the function
    it compiled), so that a graph that is this one, node for node, can reuse it (:func:`generated_code`)."""
    graph = gm.__dict__.get("_graph")
    if graph is None:
        return
    _GENERATED[graph] = GeneratedCode(
        gm.__dict__["_code"], forward, gm.__dict__.get("_lineno_map"), gm.__dict__.get("_prologue_start", 0),
        graph_fingerprint(graph),
    )


def graph_fingerprint(graph: Graph) -> tuple[Any, ...]:
    """What a graph's generated code depends on, node by node: op, name, target, args and kwargs (argument
    nodes by identity).  Two fingerprints of one graph are equal only if no node was added, removed,
    retargeted or rewired in between."""
    return tuple((n.op, n.name, n.target, n.args, n.kwargs) for n in graph.nodes)


def _has_fingerprint(graph: Graph, recorded: tuple[Any, ...]) -> bool:
    """``graph_fingerprint(graph) == recorded``, node by node, stopping at the first difference (the fields of
    a node not edited since are the very objects recorded)."""
    if len(graph.nodes) != len(recorded):
        return False
    try:
        for n, (op, name, target, args, kwargs) in zip(graph.nodes, recorded):
            if not (
                op == n.op and name == n.name and (target is n.target or target == n.target)
                and (args is n.args or args == n.args) and (kwargs is n.kwargs or kwargs == n.kwargs)
            ):
                return False
    except Exception:  # noqa: BLE001 - an argument whose == is not a bool (a tensor constant): not provably the same
        return False
    return True


def generated_code(gm: GraphModule) -> GeneratedCode | None:
    """The code recorded for ``gm``'s graph by :func:`record_generated_code`, when it is still the code of
    ``gm`` and of its graph: nothing recompiled ``gm`` since, and no node of its graph was added, removed,
    retargeted or rewired (a graph edited after its code was generated, and not recompiled, runs the old
    code in ``torch.fx``; fxlora follows the graph)."""
    graph = gm.__dict__.get("_graph")
    found = _GENERATED.get(graph) if graph is not None else None
    if found is None or found.code is not gm.__dict__.get("_code"):
        return None
    if not _has_fingerprint(graph, found.nodes):
        return None
    return found


def graph_module_tree(out: GraphModule, gm: GraphModule) -> None:
    """Give ``out`` (a new graph module without a graph) the module tree that
    ``copy_graph_module(gm)`` gives its copy: what ``GraphModule(root, graph)`` copies from a shadow copy of
    ``gm`` for the targets of ``gm``'s graph, then the rest (:func:`_carry_unreferenced`)."""
    root = _shadow_graph_module_root(gm)
    out.training = root.training
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            _copy_attr(root, out, node.target)
    _carry_unreferenced(out, root)


def copy_graph_module(gm: GraphModule, cls: type[GraphModule] = GraphModule, *, code: bool = True, **kwargs: Any) -> GraphModule:
    """A new ``cls`` over a shadow copy of ``gm``'s modules and a copy of its graph and ``meta`` (the
    nodes' and the module's: fxlora's records travel with the copy); ``code=False``: without code, for a
    pass to edit (see :func:`build_graph_module`)."""
    root = _shadow_graph_module_root(gm)
    out = build_graph_module(cls, root, copy_graph(gm.graph), type(gm).__name__, code=code, **kwargs)
    _carry_unreferenced(out, root)
    out.meta = copy.deepcopy(getattr(gm, "meta", {}))
    keep_non_persistent(out)
    return out


def _carry_unreferenced(out: GraphModule, root: nn.Module) -> None:
    """``GraphModule(root, graph)`` copies only what the graph reads; also carry the modules, parameters
    and buffers it does not read now (an inactive adapter's factors, another adapter's copy of a module it
    trains in full), from the same shadow copy."""
    for name, module in root.named_modules(remove_duplicate=False):
        if not name:
            continue
        owner_path, _, attr = name.rpartition(".")
        try:
            owner = out.get_submodule(owner_path) if owner_path else out
        except AttributeError:
            continue  # its parent was carried whole, or is a plain attribute
        current = owner._modules.get(attr)
        if current is None:
            owner.add_module(attr, module)
    for kind, named in (("parameter", root.named_parameters), ("buffer", root.named_buffers)):
        for name, value in named(remove_duplicate=False):
            owner_path, _, attr = name.rpartition(".")
            owner = out.get_submodule(owner_path) if owner_path else out
            if attr in owner._parameters or attr in owner._buffers:
                continue
            if kind == "parameter":
                owner.register_parameter(attr, value)
            else:
                owner.register_buffer(attr, value)


# --------------------------------------------------------------------------------------------- #
# torch.export capture
# --------------------------------------------------------------------------------------------- #


def export_capture(
    model: nn.Module,
    example_inputs: Sequence[Any] = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = "auto",
    causal_attention: bool = True,
) -> tuple[nn.Module, GraphModule]:
    """Capture a shadow copy of ``model`` with ``torch.export`` (non-strict), in training mode, and
    return ``(root, graph_module)`` with mode-dependent ops made live (``fxlora.passes.make_mode_aware``)
    and, with ``causal_attention``, a causal mask computed from the lengths alone given to the attention as
    ``is_causal`` (``fxlora.passes.causal_attention``).
    The graph module is returned without code (see :func:`build_graph_module`) when fxlora changed its graph:
    build a graph module of its graph, or call :func:`ensure_code`.

    ``dynamic_shapes="auto"`` marks every dimension of every tensor input ``Dim.AUTO``; pass ``None`` for
    a graph specialised to the example shapes, or torch.export's own ``dynamic_shapes`` spec.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}.")
    # an example input that is a view (ids[:, :16]) makes torch.export guard its base's shape too, and the
    # captured graph then fails on inputs that are not views of such a base: capture from copies
    args, kwargs = pytree.tree_map_only(
        torch.Tensor, lambda t: t.clone() if t._base is not None else t, (tuple(example_inputs), dict(example_kwargs or {}))
    )
    if not args and not kwargs:
        raise TraceError(
            f"capturing {type(model).__name__} with torch.export needs example inputs: "
            "pass example_inputs=(...) and/or example_kwargs={...}."
        )
    root = shadow_copy(model)
    root.train()
    before, during = _module_state(root), {}
    # torch.export restores Python attributes after tracing: read them at the end of the traced forward()
    hook = root.register_forward_hook(lambda module, inputs, output: during.update(_module_state(module)))
    attempts = [dynamic_shapes]
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        attempts = [_export_dynamic_spec(root, args, kwargs), None]
    error: Exception | None = None
    try:
        ep = None
        for spec in attempts:
            try:
                with gc_as_before():  # torch's work, not fxlora's graph building
                    ep = torch.export.export(root, args, kwargs, dynamic_shapes=spec, strict=False)
                break
            except Exception as e:  # noqa: BLE001 - reported below
                error = e
    finally:
        hook.remove()
    if ep is None:
        assert error is not None
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {first}.{_failing_line(error)} "
            "Check that the example inputs are what forward() expects (for Hugging Face decoders pass "
            "example_kwargs={'use_cache': False}); see torch.export's documentation for unsupported constructs."
        ) from error
    _check_state_unchanged(model, before, during or _module_state(root), "export")
    gm = ep.module()
    with code_later(gm):  # the caller builds its own module from this graph, which generates the code once
        calling.install(gm, root.forward, args, kwargs, type(model).__name__)
        make_mode_aware(gm)
        if causal_attention:
            causal_attention_pass(gm)
    return root, gm


def _export_dynamic_spec(root: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A ``dynamic_shapes`` spec, keyed by forward()'s parameter names, with every tensor dim AUTO."""
    import inspect

    from torch.export import Dim

    def spec(x: Any) -> Any:
        return {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None

    bound = inspect.signature(root.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}
