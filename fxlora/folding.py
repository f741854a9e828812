""":func:`fold`: the deployable model, the base graph with merged weights, as a new module; and
:func:`load_folded`: the merged weights back in the user's own model object.

The folded graph of a rewritten module is always the same (the base graph), whatever the adapters'
values, so it is built once (a copy of the module run through ``fxlora.passes.FoldPass`` with no
adapter: the *template*) and cached on the module, keyed by its code.  Each fold then only computes
the merged weights and makes a new module from the template: its own class (so that recompiling one
folded module never touches another), its own module tree over the current tensors (non-adapted
weights share storage with the rewritten module, as before), and the template's generated code.  The
graph is copied the first time the folded module's ``.graph`` is read.  So a fold costs the weight
arithmetic, not a graph copy and code generation.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.node import map_arg
from torch.nn.modules.module import _IncompatibleKeys

from .distributed import full, plain_class
from .errors import ArgumentError, CheckpointError
from .passes import FoldPass, InlineUnits, fold_graph, fold_modules, merged_weights, unit_paths
from .passes.infra import check_contract
from .pickling import reduce_folded
from .provenance import (
    active_adapters,
    adapter_state,
    adapters_of,
    graph_sites,
    node_info,
    require_unserved,
)
from .quantized import is_quantized
from .sites import get_buffer, get_parameter, try_submodule
from .tracing import (
    GeneratedCode,
    copy_graph_module,
    ensure_code,
    gc_paused,
    generated_code,
    graph_module_tree,
    keep_non_persistent,
    shallow_copy,
)

__all__ = ["fold", "load_folded", "FOLD_TEMPLATE", "BASE_CODE", "CAPTURED_CODE"]

#: ``gm.__dict__`` keys: the fold template, ``(key, template)``; and the code of the base graph, kept by the
#: rewrite, ``(gm's code then, GeneratedCode)`` (see :func:`_base_code`)
FOLD_TEMPLATE = "_fxlora_fold_template"
BASE_CODE = "_fxlora_base_code"
#: ``gm.__dict__`` key of a capture of a graph module: the code of the graph it copied, which a rewrite of the
#: capture hands on as its ``BASE_CODE`` (not pickled: it holds a compiled function)
CAPTURED_CODE = "_fxlora_captured_code"


@gc_paused()
def fold(
    gm: GraphModule,
    *,
    dtype: torch.dtype | None = None,
    adapters: Mapping[str, float] | None = None,
    requantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GraphModule:
    """A new plain ``GraphModule`` with the LoRA updates folded into the weights.

    Each merged weight is ``W + sum(coeff * delta)`` over ``adapters`` (adapter name -> coefficient;
    default: the active adapters, 1 each), computed in float32 (float64 for float64 weights) and rounded
    once, to ``dtype`` when given (the other floating-point parameters and buffers are cast to it too)
    or to the base weight's dtype.  A folded adapter's fully trained modules (``train_modules``) take
    the place of the model's.  The result has the base model's graph and state-dict keys; tensors that
    were not adapted share storage with ``gm``, and ``gm`` itself is not modified.

    A quantized base weight (:mod:`fxlora.quantized`) is dequantized before merging, so its merged weight
    is dense, in the weight's compute dtype (or ``dtype``); ``requantize`` (a function of the dense merged
    weight, such as ``torchao.quantization.to_nf4``) quantizes it again.  Quantized weights that were not
    adapted stay as they are, also with ``dtype``.
    """
    require_unserved(gm, "fold")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentError(f"fold(dtype=...) must be a floating-point torch.dtype, got {dtype!r}.")
    if requantize is not None and not callable(requantize):
        raise ArgumentError(
            f"fold(requantize=...) takes a function of the dense merged weight (e.g. torchao.quantization.to_nf4), "
            f"got {type(requantize).__name__}."
        )
    weights = _weights(gm, adapters)
    template = _template(gm)
    merged = merged_weights(gm, weights, dtype, requantize)
    out = _instantiate(template, gm, merged, _sources(gm, weights))
    if dtype is not None:
        _cast(out, dtype)
    return out


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` for its dense floating-point tensors (a tensor under several names stays one);
    quantized ones stay as they are."""
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is None or is_quantized(t) or not t.is_floating_point() or t.dtype == dtype:
                    continue
                if id(t) not in memo:
                    cast = t.detach().to(dtype)
                    memo[id(t)] = nn.Parameter(cast, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else cast
                table[key] = memo[id(t)]


def _weights(gm: GraphModule, adapters: Mapping[str, float] | None) -> dict[str, float]:
    known = adapters_of(gm)
    if adapters is None:
        weights = {name: 1.0 for name in active_adapters(gm)}
    else:
        if not isinstance(adapters, Mapping):
            raise ArgumentError(f"fold(adapters=...) takes a dict of adapter name -> weight, got {type(adapters).__name__}.")
        for name, coeff in adapters.items():
            if name not in known:
                raise ArgumentError(
                    f"fold(adapters=...): no adapter named {name!r}; this module has {', '.join(map(repr, known))}."
                )
            if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff):
                raise ArgumentError(f"fold(adapters=...): the weight of {name!r} must be a finite number, got {coeff!r}.")
        weights = {name: float(coeff) for name, coeff in adapters.items()}
    trained = adapter_state(gm).get("train_modules", {})
    owners: dict[str, str] = {}
    for name, coeff in weights.items():
        for path in trained.get(name, {}):
            if path in owners:
                raise ArgumentError(f"fold: adapters {owners[path]!r} and {name!r} both train module '{path}' in full.")
            owners[path] = name
            if coeff != 1:
                raise ArgumentError(
                    f"fold: adapter {name!r} trains module '{path}' in full, which cannot be scaled: fold it with weight 1."
                )
    return weights


def _template(gm: GraphModule) -> GraphModule:
    """The folded structure of ``gm`` (the base graph, no adapter), built once per graph version."""
    key = (id(gm.graph), hash(gm.code))
    cached = gm.__dict__.get(FOLD_TEMPLATE)
    if cached is not None and cached[0] == key:
        return cached[1]
    base = _base_code(gm)
    if base is not None:
        template = _template_over(gm, base)
    else:
        template = copy_graph_module(gm, code=False)  # its code is generated once, from the folded graph
        if unit_paths(template):  # the folded model is the flat base graph
            InlineUnits()(template)
        FoldPass(weights={})(template)
        ensure_code(template)
    gm.__dict__[FOLD_TEMPLATE] = (key, template)
    return template


def _base_code(gm: GraphModule) -> GeneratedCode | None:
    """The code of ``gm``'s base graph, when :func:`fxlora.rewrite` kept it (it rewrote a graph module whose
    code fxlora had generated: a capture or a plan) and ``gm`` still has the code the rewrite gave it."""
    entry = gm.__dict__.get(BASE_CODE)
    if entry is None or entry[0] != gm.__dict__.get("_code"):
        return None
    if generated_code(gm) is None:  # gm's graph was edited after its code was generated: follow the graph
        return None
    return entry[1]


def _template_over(gm: GraphModule, base: GeneratedCode) -> GraphModule:
    """The template of ``gm`` over its base graph's code: what the template built by running ``FoldPass`` on
    a copy of ``gm`` is (the same module tree, ``meta`` and attributes), except that its ``forward`` is the
    base graph's, already compiled, and its graph is built from a record of ``gm``'s graph taken now, the
    first time a folded module's graph is read (:func:`_template_graph`)."""
    graph = gm.graph
    cls = type(type(gm).__name__, (GraphModule,), {"forward": base.forward})
    template = object.__new__(cls)
    nn.Module.__init__(template)
    graph_module_tree(template, gm)
    tracer_cls = graph._tracer_cls  # as GraphModule(root, copy.deepcopy(graph)) sets it
    template._tracer_cls = tracer_cls if tracer_cls and "<locals>" not in tracer_cls.__qualname__ else None
    template._tracer_extras = {}
    template._replace_hooks = []
    template._create_node_hooks = []
    template._erase_node_hooks = []
    template._deepcopy_hooks = []
    template.shape_env = None
    template.meta = copy.deepcopy(getattr(gm, "meta", {}))
    keep_non_persistent(template)
    fold_modules(template, {}, adapters_of(template))
    codegen = copy.deepcopy(graph._codegen)
    if isinstance(codegen, _PyTreeCodeGen):  # as recompile() sets them
        template._in_spec = codegen.pytree_info.in_spec
        template._out_spec = codegen.pytree_info.out_spec
    template._code = base.code
    template._lineno_map = base.lineno_map
    template._prologue_start = base.prologue_start
    nodes = [(n, n.op, n.name, n.target, n.args, n.kwargs, n.type, n.meta.copy()) for n in graph.nodes]
    _LATER[template] = (nodes, codegen, graph._tracer_cls)
    return template


#: template -> the record of the rewritten graph it folds, until its graph is built (:func:`_template_graph`)
_LATER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LATER_LOCK = threading.Lock()


def _template_graph(template: GraphModule) -> Graph:
    """The template's graph: the base graph, built the first time it is needed (a copy of the recorded
    rewritten graph, as ``copy.deepcopy`` makes it, folded by the fold pass's graph edits)."""
    graph = template.__dict__.get("_graph")
    if graph is not None:
        return graph
    with _LATER_LOCK:  # two folds of one template may read their graphs from two threads
        graph = template.__dict__.get("_graph")
        if graph is None:
            graph = _build_template_graph(template)
    return graph


def _build_template_graph(template: GraphModule) -> Graph:
    nodes, codegen, tracer_cls = _LATER.pop(template)
    graph = Graph(tracer_cls=tracer_cls)
    copies: dict[Node, Node] = {}
    for node, op, name, target, args, kwargs, type_expr, meta in nodes:
        if op == "output":
            new = graph.output(map_arg(args[0], copies.__getitem__), type_expr=type_expr)
            new.meta = meta
            break
        new = graph.create_node(
            op, target, map_arg(args, copies.__getitem__), map_arg(kwargs, copies.__getitem__), name, type_expr
        )
        new.meta = meta
        copies[node] = new
    graph._codegen = codegen
    fold_graph(graph)
    graph.owning_module = template
    graph.lint()
    check_contract(not any(node_info(n) for n in graph.nodes), "fold left LoRA nodes in the graph")
    template.__dict__["_graph"] = graph
    return graph


def _sources(gm: GraphModule, weights: Mapping[str, float]) -> dict[str, str]:
    """Module path -> the path in ``gm`` whose tensors it takes: a folded adapter's copy of a module it
    trains in full."""
    trained = adapter_state(gm).get("train_modules", {})
    return {path: copy_path for name in weights for path, copy_path in trained.get(name, {}).items()}


def _instantiate(template: GraphModule, gm: GraphModule, merged: dict[str, torch.Tensor], sources: dict[str, str]) -> GraphModule:
    # A class of its own (recompiling one folded module must not touch another), reusing the template's
    # generated forward; named as torch names per-instance classes, so that GraphModule.__new__ (deepcopy,
    # unpickling) builds its usual class from the code instead of subclassing this one.
    new_cls = type(
        "GraphModuleImpl",
        (GraphModule,),
        {
            "forward": type(template).forward,
            "graph": _lazy_graph,
            "_graph": _shared_graph(template),
            "__jit_unused_properties__": [*GraphModule.__jit_unused_properties__, "_graph"],
            "__reduce__": _reduce_folded,
            "__deepcopy__": _deepcopy_folded,
        },
    )
    out = object.__new__(new_cls)  # not GraphModule.__new__, which would make yet another class
    nn.Module.__init__(out)
    state_keys = set(out.__dict__)
    for key, value in template.__dict__.items():
        if key not in state_keys:
            out.__dict__[key] = value
    out.__dict__["_fxlora_shared_graph"] = True
    out.meta = copy.copy(template.meta)
    memo: dict[int, Any] = {}

    def source(name: str) -> str:
        for path, copy_path in sources.items():
            if name == path or name.startswith(path + "."):
                return copy_path + name[len(path):]
        return name

    for name, value in merged.items():  # one new parameter per merged weight, under each of its names (ties)
        old = get_parameter(gm, name)
        memo[id(old)] = nn.Parameter(value, requires_grad=old.requires_grad)

    def tensor(kind: str, name: str) -> torch.Tensor:
        value = get_parameter(gm, source(name)) if kind == "parameter" else get_buffer(gm, source(name))
        if id(value) not in memo:
            data = full(value).detach()  # a sharded (FSDP2) tensor is gathered: the folded module is whole
            memo[id(value)] = (
                nn.Parameter(data, requires_grad=value.requires_grad) if kind == "parameter" else data.clone()
            )
        return memo[id(value)]

    def clone(module: nn.Module, target: nn.Module, prefix: str) -> None:
        target._parameters = {k: None if p is None else tensor("parameter", prefix + k) for k, p in module._parameters.items()}
        target._buffers = {k: None if b is None else tensor("buffer", prefix + k) for k, b in module._buffers.items()}
        children = {}
        for k, child in module._modules.items():
            if child is None:
                children[k] = None
                continue
            new = shallow_copy(child)
            for attr, value in list(new.__dict__.items()):
                if attr == "_non_persistent_buffers_set":
                    new.__dict__[attr] = set(value)
                elif isinstance(value, dict):
                    # the folded model is a fresh module: no hooks (FSDP2's, or the user's on gm) carry over
                    new.__dict__[attr] = type(value)() if attr.endswith("hooks") or attr.endswith("hooks_with_kwargs") else copy.copy(value)
            new.__class__ = plain_class(child)
            clone(child, new, f"{prefix}{k}.")
            children[k] = new
        target._modules = children

    clone(template, out, "")
    out._non_persistent_buffers_set = set(template._non_persistent_buffers_set)  # the model's state-dict keys
    # the folded model runs in the mode gm is in now, module by module (the template keeps the modes of the
    # fold it was built for)
    for name, module in out.named_modules():
        module.training = (try_submodule(gm, source(name)) or gm).training if name else gm.training
    return out


def _lazy_graph_get(self: GraphModule) -> Any:
    """The folded module's own graph: the template's, copied the first time it is read."""
    if self.__dict__.pop("_fxlora_shared_graph", False):
        graph = copy.deepcopy(self._graph)
        graph.owning_module = self
        self.__dict__["_graph"] = graph
    return self._graph


def _lazy_graph_set(self: GraphModule, graph: Any) -> None:
    self.__dict__.pop("_fxlora_shared_graph", None)
    GraphModule.graph.fset(self, graph)  # type: ignore[attr-defined]


_lazy_graph = property(_lazy_graph_get, _lazy_graph_set)


def _shared_graph(template: GraphModule) -> property:
    """A folded module's ``_graph``: the one in its ``__dict__``; until there is one, the template's graph
    (built then, see :func:`_template_graph`), which ``graph`` copies when it is first read."""

    def get(self: GraphModule) -> Graph:
        graph = self.__dict__.get("_graph")
        if graph is None:
            graph = self.__dict__["_graph"] = _template_graph(template)
        return graph

    def set_(self: GraphModule, graph: Graph) -> None:
        self.__dict__["_graph"] = graph

    return property(get, set_)


def _reduce_folded(self: GraphModule) -> tuple[Any, ...]:
    self._graph  # noqa: B018 - torch's __reduce__ reads the graph from __dict__
    return reduce_folded(self)


def _deepcopy_folded(self: GraphModule, memo: dict[int, Any]) -> GraphModule:
    self._graph  # noqa: B018 - torch's __deepcopy__ reads the graph from __dict__
    return GraphModule.__deepcopy__(self, memo)


def load_folded(model: nn.Module, folded: GraphModule) -> _IncompatibleKeys:
    """Give ``model``, the user's own model object, the merged weights of ``folded`` (the module :func:`fold`
    returned, or a rewritten module, which is folded first): a Hugging Face model can then ``generate`` and
    ``save_pretrained`` with them.  This is the only fxlora call that changes the model passed to
    :func:`fxlora.rewrite`.

    The folded module has ``model``'s state-dict keys (fxlora keeps non-persistent buffers and
    torch.export's lifted constants out of them, and tied weights under every name), so this is
    ``model.load_state_dict(folded.state_dict(), strict=True, assign=True)`` with checks first: a key
    ``model`` lacks, a tensor of another shape, or one whose names in ``model`` are tied but whose values in
    ``folded`` differ raises :class:`~fxlora.errors.CheckpointError` and loads nothing.  Keys the folded
    module lacks (parameters a symbolically traced graph never reads, so that fold cannot have changed
    them) are left as they are and returned as ``missing_keys``.

    The tensors are *assigned*, not copied into ``model``'s own: the module :func:`fxlora.rewrite` returned
    shares its base weights with ``model``, and writing the merged values into them would add the update
    to that module (and to every later fold of it) a second time.  Each parameter that changes becomes a
    new ``nn.Parameter`` with the old one's ``requires_grad`` and attributes, on the old one's device and in
    its dtype, holding its own copy (training ``model`` afterwards does not change ``folded``); parameters
    tied in ``model`` stay one object; a tensor already holding the value is kept as it is.  An optimizer
    built over ``model``'s parameters before this call still holds the replaced ones: build it after.
    """
    if not isinstance(model, nn.Module) or not isinstance(folded, nn.Module):
        raise ArgumentError(
            f"load_folded(model, folded) takes the model and the folded module, got {type(model).__name__} and "
            f"{type(folded).__name__}."
        )
    if isinstance(folded, GraphModule) and graph_sites(folded):
        folded = fold(folded)
    source, target = folded.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    unexpected = [k for k in source if k not in target]
    mismatched = [
        f"'{k}' {tuple(v.shape)} (the model has {tuple(target[k].shape)})"
        for k, v in source.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    slots = _tensor_slots(model)  # id(tensor) -> every (module, table, key) holding it in the model
    new_values: dict[int, torch.Tensor] = {}  # id(model tensor) -> its value from folded
    split = []
    for k, value in source.items():
        if k not in target or tuple(value.shape) != tuple(target[k].shape):
            continue
        old = target[k]
        earlier = new_values.setdefault(id(old), value)
        if earlier is not value and not torch.equal(earlier.detach().to(value.device, value.dtype), value.detach()):
            split.append(k)
    if unexpected or mismatched or split:
        problems = []
        if unexpected:
            problems.append(f"tensors the model does not have: {', '.join(unexpected[:6])}")
        if mismatched:
            problems.append(f"tensors of another shape: {', '.join(mismatched[:6])}")
        if split:
            problems.append(f"tensors tied in the model but with different values in the folded module: {', '.join(split[:6])}")
        raise CheckpointError(
            "load_folded: the folded module does not fit this model (" + "; ".join(problems) + "). Pass the model "
            "that was rewritten, and the module fold returned for it. Nothing was loaded."
        )
    with torch.no_grad():
        for k in source:
            old = target[k]
            value = new_values.pop(id(old), None)
            if value is None:
                continue  # a tie: done under its first name
            new = _assigned(old, value)
            if new is old:
                continue
            for table, key in slots[id(old)]:
                table[key] = new
    missing = [k for k in target if k not in source]
    return _IncompatibleKeys(missing, [])


def _tensor_slots(model: nn.Module) -> dict[int, list[tuple[dict, str]]]:
    """id(tensor) -> every (parameter or buffer table, key) that holds it in ``model`` (ties included)."""
    slots: dict[int, list[tuple[dict, str]]] = {}
    seen: set[int] = set()
    for mod in model.modules():  # each module object once, however many names it has
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is not None:
                    slots.setdefault(id(t), []).append((table, key))
    return slots


def _assigned(old: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """What replaces ``old`` in the model: ``old`` itself when it already holds ``value`` (the same storage,
    or equal values), else a new tensor of its own (never sharing ``value``'s storage) with ``value``'s
    values in ``old``'s dtype and device (a new ``nn.Parameter`` with ``old``'s ``requires_grad`` and
    attributes, for a parameter)."""
    data = value.detach()
    if data.device != old.device or data.dtype != old.dtype:
        data = data.to(device=old.device, dtype=old.dtype)
    if (data.data_ptr() == old.data_ptr() and data.stride() == old.stride()) or torch.equal(data, old.detach()):
        return old
    if data.data_ptr() == value.data_ptr():  # the model gets its own copy, not the folded module's storage
        data = data.clone()
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        new.__dict__.update(old.__dict__)  # attributes set on the parameter (_is_hf_initialized, ...)
        return new
    return data
