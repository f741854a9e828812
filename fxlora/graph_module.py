"""``LoraGraphModule``: the ``GraphModule`` that :func:`fxlora.rewrite` returns.

It is an ordinary ``torch.fx.GraphModule`` (its graph holds the LoRA branches, it trains with any
optimizer and wraps in DDP/FSDP) with two additions.

``merge_on_eval``
    * off (the default): ``eval()`` keeps running the branches, exactly as in training minus dropout;
    * on: in eval mode the forward runs a cached :func:`fxlora.fold` of the module (the base graph with
      merged weights: no extra operators), and ``train()`` returns to the branches and drops the cache.
      The trainable tensors are never written: after any number of train/eval toggles every weight is
      bit-identical (loralib merges into ``weight.data`` and subtracts it back, which drifts).

    The cache is never stale.  Before each eval-mode forward it is checked two ways: every parameter
    and buffer must be the same object, at the same address, with the same version counter (this
    catches optimizer steps, loaded checkpoints, ``p.data = ...``), *and* every tensor the fold copied
    must still hold, bit for bit, what it held when the fold was built (this catches what version
    counters miss: ``p.data.zero_()``, ``p.data.copy_(...)``, writes through numpy or DLPack views).
    The tensors the fold copied are the LoRA factors (compared with a snapshot; they are small), the
    adapted base weights (compared with a snapshot) and the buffers (compared with the fold's own
    copies); every other tensor is shared with the folded module, so it cannot go stale.

    Cost, while in eval mode: two extra copies of every *adapted* base weight (the merged weight and
    the snapshot) plus one of the LoRA factors; and per forward, one pass that reads the adapted
    weights twice (live and snapshot) and the LoRA factors and buffers.  That is negligible next to a
    forward over a batch of hundreds of tokens, but comparable to a single-token forward, so serve with
    :func:`fxlora.fold` (no checks, no copies).  A rebuild (after an optimizer step, say) is a fold plus
    a snapshot of each changed tensor; a snapshot that still holds its tensor's bits (an adapted weight the
    step did not change) is compared and kept, not copied again.  Gradients do not reach the LoRA
    parameters through an eval-mode forward.

Pickling
    ``torch.save(gm)`` / ``torch.load(..., weights_only=False)``, ``pickle`` and ``copy.deepcopy`` give
    back a ``LoraGraphModule`` with the same graph, node for node (not re-traced from its code), with
    fxlora's records (``gm.meta["fxlora"]`` and every ``node.meta["fxlora"]``), so fold, the state-dict
    helpers and ``merge_on_eval`` work on the copy.  Node metadata that cannot be pickled (fake tensors
    of a ``torch.export`` capture, module types defined inside a function) is left out.  A module
    captured with ``torch.export`` (rewritten, folded or served) holds torch's input-guard function,
    which cannot be pickled: ``pickle`` and ``torch.save`` refuse it with a
    :class:`~fxlora.errors.CheckpointError` saying what to do instead (so does a hook defined inside a
    function); ``copy.deepcopy`` works.

Inference mode
    A module built under ``torch.inference_mode()`` holds inference tensors, which have no version
    counter: ``merge_on_eval`` then stamps them by identity and address alone (the bit-for-bit check
    still sees every change of their values) and builds the fold in inference mode.
"""

from __future__ import annotations

import functools
import inspect
import pickle
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from . import provenance
from .errors import ArgumentError, CheckpointError
from .folding import BASE_CODE, CAPTURED_CODE, FOLD_TEMPLATE, fold
from .pickling import refuse_unpicklable_modules
from .stack_chunks import stack_safe
from .tracing import copy_graph, gc_paused, record_generated_code

__all__ = ["LoraGraphModule"]

#: ``gm.__dict__`` key of the eager forward of the lowered graph: ``(the code it is for, the name of a LoRA
#: factor or None, the forward: None until built, False when nothing lowers, the registration count last
#: seen, whether every tensor was plain then)`` (see :func:`_lowered_forward`)
_LOWERED = "_fxlora_lowered"
_HALF = (torch.float16, torch.bfloat16)

#: Version of the pickled form (see :meth:`LoraGraphModule.__reduce__`).
_PICKLE_VERSION = 1
# Node metadata that only describes a capture in progress (fake tensors, symbolic shapes).
_CAPTURE_ONLY_META = frozenset({"val", "example_value", "unbacked_bindings", "tensor_meta"})
# what a copy or an unpickled module generates again, or rebuilds on demand (the fold caches)
_COMPILED = ("_graph", "_code", "_lineno_map", "_prologue_start", "_fxlora_cache", FOLD_TEMPLATE, BASE_CODE, CAPTURED_CODE,
             _LOWERED, "_compiled_call_impl")  # the last: nn.Module.compile()'s, which nn.Module does not pickle either


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element size, so that equality is bit equality (-0.0 is not 0.0,
    and a NaN equals itself)."""
    if t.is_floating_point() or t.is_complex():
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        size = t.element_size()
        if t.is_complex():
            t = torch.view_as_real(t)
            size //= 2
        return t.view(ints[size])
    return t


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        and a.device == b.device
    )


class _FoldCache:
    """A folded module and how to tell it is still the fold of the live tensors.  ``previous``: the
    snapshots (tensor name -> copy) of the fold this one replaces, kept where they still hold the live bits
    (an optimizer step changes the LoRA factors, not the adapted base weights: their snapshots are
    compared, not copied again)."""

    def __init__(self, owner: LoraGraphModule, stamp: tuple[Any, ...], previous: dict[str, torch.Tensor] | None = None) -> None:
        self.stamp = stamp
        self.module = fold(owner)
        self.module.train(False)
        parameters, buffers = dict(self.module.named_parameters()), dict(self.module.named_buffers())
        previous = previous or {}
        self.watch: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.snapshots: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for kind, named in (("parameter", owner.named_parameters()), ("buffer", owner.named_buffers())):
                for name, live in named:
                    live = live.detach()
                    mine = (parameters if kind == "parameter" else buffers).get(name)
                    if mine is not None and _shares(live, mine):
                        continue  # the folded module reads this very memory: never stale
                    if kind == "buffer" and mine is not None and _same_bits(live, mine.detach()):
                        self.watch.append((live, mine.detach()))  # the fold's own copy of a buffer is the snapshot
                        continue
                    # a LoRA factor, or an adapted weight (the fold holds the merged one)
                    snapshot = previous.get(name)
                    if snapshot is None or not _same_bits(live, snapshot):
                        snapshot = live.clone()
                    self.snapshots[name] = snapshot
                    self.watch.append((live, snapshot))

    def fresh(self, stamp: tuple[Any, ...]) -> bool:
        if stamp != self.stamp:
            return False
        with torch.no_grad():
            return all(_same_bits(live, snapshot) for live, snapshot in self.watch)


class LoraGraphModule(GraphModule):
    def __init__(
        self,
        root: torch.nn.Module | dict[str, Any],
        graph: Graph,
        class_name: str = "GraphModule",
        *,
        merge_on_eval: bool = False,
    ) -> None:
        super().__init__(root, graph, class_name)
        self.__dict__["merge_on_eval"] = bool(merge_on_eval)
        self.__dict__["lower_branches"] = "auto"  # lowers CUDA float16/bfloat16 forwards (docs/performance.md)
        self.__dict__["_fxlora_cache"] = None

    def recompile(self):  # type: ignore[override]
        code = super().recompile()
        cls = type(self)
        record_generated_code(self, cls.forward)  # a rewrite of this graph folds back to it: fold reuses this code
        graph_forward = stack_safe(cls.forward)

        @functools.wraps(graph_forward)
        def forward(self: LoraGraphModule, *args: Any, **kwargs: Any) -> Any:
            if not torch.compiler.is_compiling():
                # eagerly, and as the frame torch.compile(gm) starts at (which Dynamo runs as Python: see
                # _run_as_python): pick what runs, then run it; under torch.compile the call below is the
                # frame Dynamo compiles
                return _choose_forward(self, graph_forward, args, kwargs)(*args, **kwargs)
            # traced inline by a compiler (a module that calls this one is compiled): the graph itself
            if not self.training and self.__dict__.get("merge_on_eval", False):
                return self.merged_module()(*args, **kwargs)
            return graph_forward(self, *args, **kwargs)

        _run_as_python(forward)
        cls.forward = forward  # type: ignore[method-assign]
        return code

    def train(self, mode: bool = True) -> LoraGraphModule:
        super().train(mode)
        if mode:
            self.__dict__["_fxlora_cache"] = None
        return self

    def _stamp(self) -> tuple[Any, ...]:
        """The adapters' state (which run: ``set_adapter`` changes the graph, not the tensors) and the identity,
        address and version of every parameter and buffer (an optimizer step, a loaded checkpoint, a bias
        given its own storage, ``p.data = t``).  An inference tensor (made under
        ``torch.inference_mode()``) has no version counter: its stamp is identity and address, and the
        bit-for-bit check of :class:`_FoldCache` still sees any change of its values."""
        state = provenance.adapter_state(self)
        return (
            state.get("version", 0),  # bumped by set_adapter, add/delete_adapter, combine_adapters: a new graph
            tuple(state.get("active", ())),
            *((id(t), None if t.is_inference() else t._version, t.data_ptr()) for t in (*self.parameters(), *self.buffers())),
        )

    @property
    def accepts_loss_kwargs(self) -> bool:
        """For ``transformers.Trainer``: whether ``forward`` takes its loss keywords (``num_items_in_batch``).
        Only when they were given at capture: a module captured with torch.export keeps the model's
        ``**kwargs`` in its signature to name an uncaptured keyword in its error, and the Trainer would
        otherwise read that as taking them, and pass them."""
        return "num_items_in_batch" in inspect.signature(self.forward).parameters

    def merged_module(self) -> GraphModule:
        """The folded module that eval mode runs with ``merge_on_eval``, rebuilt whenever any tensor it
        was folded from changed (see the module docstring for how, and what it costs)."""
        stamp = self._stamp()
        cache = self.__dict__.get("_fxlora_cache")
        if cache is None or not cache.fresh(stamp):
            previous = cache.snapshots if cache is not None else None
            self.__dict__["_fxlora_cache"] = None  # free the old fold before building the new one
            cache = None
            # a module built under torch.inference_mode() holds inference tensors, which can be made into
            # parameters only in that mode; its fold then holds inference tensors too, and runs wherever the
            # module itself does (under torch.no_grad() or torch.inference_mode()); any other module's fold is
            # built outside inference mode, whatever mode the first eval call came in, so that a later call
            # with gradients on can use it
            frozen = any(t.is_inference() for t in (*self.parameters(), *self.buffers()))
            with gc_paused(), torch.inference_mode() if frozen else torch.inference_mode(False):
                cache = _FoldCache(self, stamp, previous)
            del previous  # the snapshots the new fold does not keep
            self.__dict__["_fxlora_cache"] = cache
        return cache.module

    # -- copies and pickles ------------------------------------------------------------------------
    def _deepcopy_init(self):  # type: ignore[override]
        merge_on_eval = self.__dict__.get("merge_on_eval", False)
        lower_branches = self.__dict__.get("lower_branches", "auto")

        def init(res: LoraGraphModule, root: Any, graph: Graph) -> None:
            LoraGraphModule.__init__(res, root, graph, merge_on_eval=merge_on_eval)
            res.__dict__["lower_branches"] = lower_branches

        return init

    def __deepcopy__(self, memo: dict[int, Any]) -> LoraGraphModule:
        # the fold caches are rebuilt on demand: not worth copying (the template is keyed by this graph)
        cache = self.__dict__.pop("_fxlora_cache", None)
        template = self.__dict__.pop(FOLD_TEMPLATE, None)
        lowered = self.__dict__.pop(_LOWERED, None)
        try:
            return super().__deepcopy__(memo)  # type: ignore[return-value]
        finally:
            self.__dict__["_fxlora_cache"] = cache
            self.__dict__[_LOWERED] = lowered
            if template is not None:
                self.__dict__[FOLD_TEMPLATE] = template

    def __copy__(self) -> LoraGraphModule:
        res = LoraGraphModule(self, self.graph, type(self).__name__, merge_on_eval=self.__dict__.get("merge_on_eval", False))
        res.__dict__["lower_branches"] = self.__dict__.get("lower_branches", "auto")
        res.meta = getattr(self, "meta", {})
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the graph itself (nodes, targets, arguments and the metadata that can be pickled) and
        the module's attributes; ``torch.fx``'s own pickling re-traces the generated code instead,
        which loses every ``node.meta`` and the module's class."""
        refuse_unpicklable_modules(self)
        body = {k: v for k, v in self.__dict__.items() if k not in _COMPILED}
        if "meta" in body:
            body["meta"] = _picklable_meta(body["meta"], keep=("fxlora",))
        state = {"version": _PICKLE_VERSION, "body": body, "graph": _graph_record(self.graph)}
        return (_unpickle_lora_graph_module, (state,))


def _choose(self: Any, graph_forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What a call of ``self`` runs: the folded module (``merge_on_eval`` in eval mode), the lowered forward,
    or the graph's own forward, bound to ``self``."""
    if not self.training and self.__dict__.get("merge_on_eval", False):
        return self.merged_module()
    lowered = _lowered_forward(self)
    if lowered is None or (not torch.is_grad_enabled() and _an_input_requires_grad(args, kwargs)):
        # no gradient recorded, but an input requires one: a train step's forward run without gradients (a
        # reentrant torch.utils.checkpoint, which runs it again with gradients for the backward): the graph,
        # which that second run computes too, not a merged forward that rounds otherwise
        return functools.partial(graph_forward, self)
    return functools.partial(lowered, self)


def _an_input_requires_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))


# Dynamo must not trace the choice (it builds graphs and modules): run as Python, never compiled
_choose_forward = torch._dynamo.disable(_choose, recursive=True) if hasattr(torch, "_dynamo") else _choose


def _run_as_python(forward: Any) -> None:
    """Have Dynamo run the frame of ``forward`` (the one ``torch.compile(gm)`` starts at) as Python and compile
    the frames it calls: the forward that :func:`_choose` picked, where that is the lowered one, is what
    ``torch.compile`` compiles.  Without the private hook (another torch), Dynamo traces ``forward`` and
    compiles the graph itself."""
    skip = getattr(getattr(torch._dynamo, "eval_frame", None), "skip_code", None)
    if skip is not None:
        skip(forward.__code__)


def _lowered_forward(self: Any) -> Any:
    """The forward of this graph with each single-adapter linear branch lowered
    (:class:`fxlora.passes.LowerLinearBranches`, run on a copy of the graph: the module's own graph,
    state dict and every pass are unchanged), calling :func:`fxlora.ops.lora_linear_eager`, which merges
    ``W + B A`` per call where that moves less memory than the branch; None where the module runs its
    own graph.  ``gm.lower_branches``: ``"auto"`` (the default) where the LoRA factors are CUDA
    float16/bfloat16, ``True`` everywhere, ``False`` never.  Where a gradient is recorded (a train step)
    the lowered calls run the graph's own operators (:func:`fxlora.ops.lora_linear_eager` merges only
    where none is), through their Python bindings: the same values and gradients as the graph, for less
    host time.  ``torch.compile(gm)`` compiles what this returns (:func:`_run_as_python`); never under
    ``torch.export``, ``torch.jit.trace``, ``torch.fx`` tracing, or a compiler tracing ``gm``'s forward inline
    (a module that calls ``gm`` compiled): those see the graph itself."""
    mode = self.__dict__.get("lower_branches", False)  # not a LoraGraphModule (an exporter's copy): its graph
    if mode is False or _capturing():
        return None
    if not (mode is True or (isinstance(mode, str) and mode == "auto")):
        raise ArgumentError(f"lower_branches must be 'auto', True or False, got {mode!r}.")
    code = self.__dict__.get("_code")
    cached = self.__dict__.get(_LOWERED)
    if cached is None or cached[0] is not code:
        cached = self.__dict__[_LOWERED] = (code, _a_lora_factor(self), None, -1, None)
    _, probe, built, seen, plain = cached
    if probe is None:
        return None
    if mode is not True:
        factor = _tensor_at(self, probe)  # a parameter, or a plain tensor under torch.func.functional_call
        if not (isinstance(factor, torch.Tensor) and factor.is_cuda and factor.dtype in _HALF):
            return None
    if seen != _REGISTRATIONS[0]:  # a parameter or buffer was set somewhere since: is every tensor still plain?
        now = _plain_tensors(self)
        if now is not plain:
            built = None
        seen, plain = _REGISTRATIONS[0], now
        self.__dict__[_LOWERED] = (code, probe, built, seen, plain)
    grad = torch.is_grad_enabled()
    if built is None:
        built = {}
        self.__dict__[_LOWERED] = (code, probe, built, seen, plain)
    forward = built.get(grad)
    if forward is None:  # lowered the first time it runs in this grad mode
        forward = built[grad] = _lower_for_eager(self, bindings=plain, grad=grad)
    return forward or None


#: parameters and buffers set on any module of this process (``register_parameter``, ``register_buffer``,
#: assignment): a lowered forward checks again whether its tensors are all plain after one
_REGISTRATIONS = [0]


def _count_registration(module: torch.nn.Module, name: str, value: Any) -> None:
    _REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)


def _plain_tensors(gm: torch.nn.Module) -> bool:
    """Whether every parameter and buffer of ``gm`` is a plain tensor (no subclass, which may handle a Python
    binding through ``__torch_function__`` otherwise than an ATen overload)."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return all(type(t) in plain for t in (*gm.parameters(), *gm.buffers()))


def _a_lora_factor(gm: LoraGraphModule) -> str | None:
    """The name of a LoRA factor of ``gm`` (where the branches run, and in what dtype); None when it has none
    of its own (a served module stacks them)."""
    for spec in provenance.graph_sites(gm).values():
        return spec.lora_A if isinstance(_tensor_at(gm, spec.lora_A), torch.Tensor) else None
    return None


def _tensor_at(gm: Any, target: str) -> Any:
    """The attribute at ``target`` (a parameter, or whatever ``torch.func.functional_call`` put there); None
    where there is none."""
    path, _, name = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(path), name, None)
    except AttributeError:
        return None


def _capturing() -> bool:
    """Whether a compiler or tracer is running the forward (it must see the graph, not the eager lowering)."""
    compiler = torch.compiler
    if compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)():
        return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return _fx_symbolic_tracing()


# torch.fx.symbolic_trace in progress (newer torch warns on is_fx_tracing, which torch.export sets too)
_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or torch.fx._symbolic_trace.is_fx_tracing


def _lower_for_eager(gm: LoraGraphModule, bindings: bool = True, grad: bool = False) -> Any:
    """The forward of ``gm``'s graph with its linear branches lowered, each lowered call running
    :mod:`fxlora.ops`'s eager functions, for forwards that record gradients (``grad``) or not; False when
    nothing lowers."""
    from fxlora import ops
    from fxlora.passes import lower_linear_branches

    lowered = GraphModule(gm, copy_graph(gm.graph))  # the same tensors, its own graph
    # sites whose base is a module call keep it: its hooks, its class and its bias are read when it runs.  A
    # site whose branch input is not x A^T keeps the graph's nodes where they are; so do a site with LoRA
    # dropout and fused siblings (a shrink they share) in the forward that records
    # gradients, so that a train step records the graph's operators in the graph's order (autograd then sums
    # each input's gradient contributions in that order: the same bits) and siblings share their shrink there.
    # Without gradients a LoRA dropout site lowers with its dropout's output, and merges where that dropout is
    # the identity (eval mode); a fused sibling lowers over its own factor and merges like any other site
    if not provenance.is_rewritten(lowered):
        return False
    if not lower_linear_branches(lowered, modules=False, h_inputs=False, dropout_inputs=not grad,
                                 sibling_inputs=not grad).modified:
        return False
    eager = {torch.ops.fxlora.lora_linear.default: ops.lora_linear_eager,
             torch.ops.fxlora.lora_linear_h.default: ops.lora_linear_h_eager}
    # the Python bindings instead of the ATen overloads, unless a tensor is a subclass, which may handle a
    # binding (__torch_function__) otherwise than its overload (_lowered_forward checks again after a
    # parameter or buffer is set)
    table = ops.BINDINGS if bindings else {}
    for node in list(lowered.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in eager:
            node.target = eager[node.target]
        elif node.target in table:
            node.target = table[node.target]
            keywords = ops.BINDING_KEYWORDS.get(node.target)
            if keywords:  # arguments the overload takes by position and the binding only by keyword
                args, kwargs = list(node.args), dict(node.kwargs)
                for index in sorted(keywords, reverse=True):
                    if len(args) > index:
                        kwargs[keywords[index]] = args.pop(index)
                node.args, node.kwargs = tuple(args), kwargs
    lowered.recompile()
    return stack_safe(type(lowered).forward)


# --------------------------------------------------------------------------------------------- #
# the pickled form (the names below are part of it: do not rename)
# --------------------------------------------------------------------------------------------- #


class _NodeRef:
    """An argument that is another node, by its position in the graph."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (_NodeRef, (self.index,))


class _OpRef:
    """A ``torch.ops`` operator (``aten.linear.default``), by name: operator objects do not pickle."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_OpRef, (self.name,))

    def resolve(self) -> Any:
        op: Any = torch.ops
        for part in self.name.split("."):
            op = getattr(op, part)
        return op


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - anything pickle refuses
        return False
    return True


def _picklable_meta(meta: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entries of ``meta`` that pickle (a dict value keeps its entries that pickle); the keys in
    ``keep`` are kept whatever happens (pickle then reports the problem)."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if key in keep:
            out[key] = value
        elif key in _CAPTURE_ONLY_META:
            continue
        elif _picklable(value):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if _picklable(k) and _picklable(v)}
    return out


def _graph_record(graph: Graph) -> dict[str, Any]:
    index = {node: i for i, node in enumerate(graph.nodes)}

    def ref(node: Node) -> Any:
        return _NodeRef(index[node])

    nodes = []
    for node in graph.nodes:
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            target = _OpRef(str(target))
        nodes.append(
            (
                node.op,
                node.name,
                target,
                map_arg(node.args, ref),
                map_arg(node.kwargs, ref),
                node.type if _picklable(node.type) else None,
                _picklable_meta(node.meta, keep=("fxlora",)),
            )
        )
    return {
        "nodes": nodes,
        "codegen": graph._codegen,
        "tracer_cls": graph._tracer_cls,
        "tracer_extras": graph._tracer_extras,
    }


def _graph_from_record(record: dict[str, Any]) -> Graph:
    graph = Graph(tracer_cls=record["tracer_cls"], tracer_extras=record["tracer_extras"])
    graph._codegen = record["codegen"]
    made: list[Node] = []

    def node_of(arg: Any) -> Any:
        if isinstance(arg, _NodeRef):
            return made[arg.index]
        if isinstance(arg, (tuple, list)):
            out = [node_of(a) for a in arg]
            return type(arg)(out) if not hasattr(arg, "_fields") else type(arg)(*out)
        if isinstance(arg, dict):
            return {k: node_of(v) for k, v in arg.items()}
        if isinstance(arg, slice):
            return slice(node_of(arg.start), node_of(arg.stop), node_of(arg.step))
        return arg

    for op, name, target, args, kwargs, type_expr, meta in record["nodes"]:
        if isinstance(target, _OpRef):
            target = target.resolve()
        node = graph.create_node(op, target, node_of(args), node_of(kwargs), name=name, type_expr=type_expr)
        if node.name != name:
            raise CheckpointError(f"the pickled graph is inconsistent: node {name!r} came back as {node.name!r}.")
        node.meta = dict(meta)
        made.append(node)
    graph.lint()
    return graph


class _Holder(torch.nn.Module):
    """The attributes of the pickled module, to build the new one from (as ``torch.fx`` does)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.__dict__ = body


def _unpickle_lora_graph_module(state: dict[str, Any]) -> LoraGraphModule:
    if state.get("version") != _PICKLE_VERSION:
        raise CheckpointError(
            f"this LoraGraphModule was pickled by another fxlora (format {state.get('version')!r}, this one reads "
            f"{_PICKLE_VERSION}); load it with that version, or save the adapter with fxlora.save_lora."
        )
    body = dict(state["body"])
    graph = _graph_from_record(state["graph"])
    gm = LoraGraphModule(_Holder(dict(body)), graph, merge_on_eval=body.get("merge_on_eval", False))
    gm.__dict__.update(body)  # submodules, parameters, buffers, hooks, meta, flags: the originals
    gm.__dict__["_fxlora_cache"] = None
    gm.recompile()
    return gm
