"""Candidate sites: every place in a captured graph where a LoRA branch could go.

This module owns *finding* sites and describing them (:class:`Candidate`); which rule selects which
candidate is :mod:`fxlora.resolution`'s job, and whether a weight is read elsewhere is
:mod:`fxlora.ties`'.  Candidates are:

* ``call_module`` nodes of ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d``,
  ``nn.ConvTranspose1d/2d/3d``, and of custom leaf modules with a 2-D ``weight`` parameter
  (``x @ W.T + b``, or ``x @ W + b`` with ``fan_in_fan_out``);
* ``call_function`` nodes whose weight operand reads a parameter, at the torch level and the ATen
  level alike:

  - a 2-D weight, directly or through one transpose (``W.t()``, ``W.T``, ``W.mT``, ``W.transpose(0, 1)``,
    ``W.permute(1, 0)``, ``aten.t`` / ``aten.numpy_T`` / ``aten.transpose`` / ``aten.permute``), read by
    ``F.linear``, ``torch.addmm``, ``x @ W`` / ``torch.matmul`` / ``torch.mm``: a *linear* site whose
    layout (``fan_in_fan_out``) is read from the graph, whatever the module's class (``FalconLinear``
    computes ``input @ self.weight.T``);
  - ``F.embedding``, ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d`` (and ``aten.convolution``);
  - a 3-D weight ``(experts, out, in)`` (or ``(experts, in, out)``), reached through expert indexing
    (``W[e]``, ``W[ids]``, ``select``, ``index_select``, ``aten.index``) and transposes of its last two
    dims, read by ``F.linear``, ``matmul`` / ``bmm`` / ``mm`` (either operand), ``torch._grouped_mm`` /
    ``F.grouped_mm`` / ``transformers::grouped_mm_fallback`` or a two-operand ``einsum``: an *experts*
    site (transformers 5 MoE blocks).

  Such a site is named after the module that owns its weight (``node.meta["nn_module_stack"]`` in
  torch.export graphs) or after the weight (``blocks.0.fc.weight`` -> site ``blocks.0.fc``; a parameter
  not called ``weight`` keeps its full name, ``blocks.0.w1``, ``mlp.experts.gate_up_proj``).

Op arguments are read by name through torch's own schema normalisation
(:func:`torch.fx.operator_schemas.normalize_function`), not through hand-written signature tables.
:func:`bind_call` gives the rewrite pass what a ``per_call`` kind (:mod:`fxlora.lora`) needs from one
call: its op with the weight operand replaced, and the views it applies to the weight.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node, Proxy
from torch.fx.node import map_arg
from torch.fx.operator_schemas import normalize_function

from .lora import Call, SiteSpec
from .provenance import BASE, node_info

__all__ = [
    "Candidate",
    "SiteOp",
    "MatmulRole",
    "WeightRead",
    "SITE_OPS",
    "MATMUL_OPS",
    "SUPPORTED",
    "find_candidates",
    "get_parameter",
    "get_submodule",
    "op_arguments",
    "weight_source",
    "read_weight",
    "view_step",
    "bind_call",
    "try_submodule",
    "op_name",
    "normalize_method_calls",
    "modules_unchanged",
]

aten = torch.ops.aten

SUPPORTED = (
    "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, leaf modules with a 2-D weight, "
    "F.linear / torch.addmm / x @ W / F.embedding / F.conv* / F.conv_transpose* calls on a parameter, and "
    "3-D MoE expert weights read per expert (F.linear(x, W[e]), bmm, grouped_mm, einsum)"
)


@dataclass(frozen=True)
class SiteOp:
    """How one functional op is adapted: its kind and the names of its arguments."""

    kind: str  # "linear" | "embedding" | "conv" | "conv_transpose"
    weight: str  # the weight argument
    input: str  # the argument the branch reads
    bias: str | None = None  # the bias argument, if the op has one
    computes_x_at_w: bool = False  # linear: True for x @ W (weight stored (in, out)), False for F.linear

    @functools.cached_property
    def data_args(self) -> frozenset[str]:
        """Arguments that may be computed in the graph (the others are hyper-parameters to bake in)."""
        return frozenset(a for a in (self.weight, self.input, self.bias) if a)


_LINEAR = SiteOp("linear", "weight", "input", "bias")
_ADDMM = SiteOp("linear", "mat2", "mat1", "input", computes_x_at_w=True)
_MATMUL = SiteOp("linear", "other", "input", computes_x_at_w=True)
_MM = SiteOp("linear", "mat2", "input", computes_x_at_w=True)
_CONV = SiteOp("conv", "weight", "input", "bias")
_CONV_T = SiteOp("conv_transpose", "weight", "input", "bias")

#: op -> how it is adapted, for symbolic (torch-level) and torch.export (ATen) graphs alike.
SITE_OPS: dict[Callable[..., Any], SiteOp] = {
    F.linear: _LINEAR,
    aten.linear.default: _LINEAR,
    torch.addmm: _ADDMM,
    aten.addmm.default: _ADDMM,
    torch.matmul: _MATMUL,
    operator.matmul: _MATMUL,
    aten.matmul.default: _MATMUL,
    torch.mm: _MM,
    aten.mm.default: _MM,
    F.embedding: SiteOp("embedding", "weight", "input"),
    aten.embedding.default: SiteOp("embedding", "weight", "indices"),
    **{fn: _CONV for fn in (F.conv1d, F.conv2d, F.conv3d)},
    **{getattr(aten, f"conv{d}d").default: _CONV for d in (1, 2, 3)},
    **{getattr(aten, f"conv{d}d").padding: _CONV for d in (1, 2, 3)},
    aten.convolution.default: _CONV,  # transposed=True makes it a conv_transpose site
    **{fn: _CONV_T for fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
    aten.conv_transpose1d.default: _CONV_T,
    aten.conv_transpose2d.input: _CONV_T,
    aten.conv_transpose3d.input: _CONV_T,
}


@dataclass(frozen=True)
class MatmulRole:
    """One way a matmul-family op may read a weight: which argument is the weight operand, which is the
    input, and which of the operand's last two dims is contracted with the input (``in_dim``: -1 for
    ``F.linear(x, V)`` and ``V @ x``, -2 for ``x @ V``)."""

    weight: str
    input: str
    in_dim: int
    drop: tuple[str, ...] = ()  # arguments (a bias) the branch's calls leave out


_ROLE_LINEAR = (MatmulRole("weight", "input", -1, ("bias",)),)
_ROLES_MATMUL = (MatmulRole("other", "input", -2), MatmulRole("input", "other", -1))
_ROLES_MM = (MatmulRole("mat2", "input", -2), MatmulRole("input", "mat2", -1))
_ROLE_GROUPED = (MatmulRole("mat2", "input", -2, ("bias",)),)


def _grouped_ops() -> dict[Any, tuple[MatmulRole, ...]]:
    ops: dict[Any, tuple[MatmulRole, ...]] = {}
    if hasattr(torch, "_grouped_mm"):
        ops[torch._grouped_mm] = _ROLE_GROUPED
    if hasattr(aten, "_grouped_mm"):
        ops[aten._grouped_mm.default] = _ROLE_GROUPED
    if hasattr(F, "grouped_mm"):
        ops[F.grouped_mm] = (MatmulRole("mat_b", "mat_a", -2, ("bias",)),)
    return ops


#: matmul-family ops that may read a (per-expert) weight -> the ways they may read it.  Besides these,
#: any op named ``*::grouped_mm_fallback`` with ``(input, weight, offs)`` (transformers' custom op) and
#: ``einsum`` with two operands are recognised.
MATMUL_OPS: dict[Any, tuple[MatmulRole, ...]] = {
    F.linear: _ROLE_LINEAR,
    aten.linear.default: _ROLE_LINEAR,
    torch.matmul: _ROLES_MATMUL,
    operator.matmul: _ROLES_MATMUL,
    aten.matmul.default: _ROLES_MATMUL,
    torch.bmm: _ROLES_MM,
    aten.bmm.default: _ROLES_MM,
    torch.mm: _ROLES_MM,
    aten.mm.default: _ROLES_MM,
    **_grouped_ops(),
}
_FALLBACK_ROLE = (MatmulRole("weight", "input", -2),)
_GROUPED_MM = frozenset(t for t, roles in MATMUL_OPS.items() if roles[0].weight in ("mat2", "mat_b") and "bias" in roles[0].drop)
_EINSUM = (torch.einsum, aten.einsum.default)


def _matmul_roles(target: Any) -> tuple[MatmulRole, ...] | None:
    roles = MATMUL_OPS.get(target)
    if roles is not None:
        return roles
    if isinstance(target, torch._ops.OpOverload) and target._schema.name.endswith("::grouped_mm_fallback"):
        return _FALLBACK_ROLE
    return None


def _function_form(node: Node) -> Callable[..., Any] | None:
    """The torch function a ``call_method`` node computes when it is a method spelling of an op fxlora
    adapts (``x.matmul(W)`` is ``torch.matmul(x, W)``, ``b.addmm(x, W.t())`` is ``torch.addmm(b, x, W.t())``:
    a tensor method takes ``self`` as the function's first argument), else None."""
    if node.op != "call_method" or not isinstance(node.target, str) or node.target.startswith("_"):
        return None
    fn = getattr(torch, node.target, None)
    if fn is None or getattr(torch.Tensor, node.target, None) is None:
        return None
    return fn if fn in SITE_OPS or fn in MATMUL_OPS else None


def normalize_method_calls(graph: torch.fx.Graph) -> int:
    """Rewrite, in place, the ``call_method`` nodes that spell an op fxlora adapts as a tensor method
    (``x.matmul(W.T)``, ``x.mm(W.t())``, ``b.addmm(x, W.t())``, ``x.bmm(W)``) as the ``call_function`` of
    the same op with the same arguments, so that they are sites exactly like their function forms (their
    layout read from the graph the same way).  Returns how many nodes it rewrote."""
    count = 0
    for node in list(graph.nodes):
        fn = _function_form(node)
        if fn is None:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(fn, tuple(node.args), dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


def op_name(target: Any) -> str:
    """A readable name of a node's target (``aten.lstm.input``, ``linear``, ``transformers.grouped_mm_fallback``)."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def _arg_type(value: Any) -> Any:
    if isinstance(value, (Node, torch.Tensor)):
        return torch.Tensor
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (Node, torch.Tensor)) for v in value):
            return typing.List[torch.Tensor]
        return typing.List[int]
    return type(value)


def op_arguments(node: Node) -> dict[str, Any]:
    """The arguments of a ``call_function`` node by name, defaults filled in, read through the op's schema
    (``operator.matmul``, which has none, is ``(input, other)``; ``einsum`` is ``(equation, operands)``)."""
    if node.target is operator.matmul:
        return {"input": node.args[0], "other": node.args[1]}
    if node.target in _EINSUM:
        rest = node.args[1:]
        operands = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        return {"equation": node.args[0] if node.args else node.kwargs.get("equation"), "operands": operands}
    normalized = normalize_function(
        node.target,  # type: ignore[arg-type]
        tuple(node.args),
        dict(node.kwargs),
        arg_types=tuple(_arg_type(a) for a in node.args),
        kwarg_types={k: _arg_type(v) for k, v in node.kwargs.items()},
        normalize_to_only_use_kwargs=True,
    )
    if normalized is None:  # no schema could be matched: read what is there
        return dict(node.kwargs)
    return dict(normalized.kwargs)


# --------------------------------------------------------------------------------------------- #
# How an operand reads a parameter: views between the get_attr and the op
# --------------------------------------------------------------------------------------------- #


def _dims(values: Any) -> list[int] | None:
    try:
        return [int(d) for d in values]
    except (TypeError, ValueError):
        return None


def _swaps_last_two(d0: Any, d1: Any, ndim: int | None) -> bool:
    if not (isinstance(d0, int) and isinstance(d1, int)):
        return False
    if ndim is None:
        return {d0, d1} == {-2, -1}
    return {d0 % ndim, d1 % ndim} == {ndim - 2, ndim - 1}


def _permute_kind(perm: list[int] | None, ndim: int | None) -> str | None:
    if perm is None or ndim is None or len(perm) != ndim:
        return None
    perm = [p % ndim for p in perm]
    lead = list(range(ndim - 2))
    if perm == lead + [ndim - 2, ndim - 1]:
        return "same"
    if perm == lead + [ndim - 1, ndim - 2]:
        return "swap"
    return None


def _val_ndim(value: Any) -> int | None:
    val = value.meta.get("val") if isinstance(value, Node) else value
    if isinstance(val, torch.Tensor):
        return val.dim()
    meta = value.meta.get("tensor_meta") if isinstance(value, Node) else None
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_full_slice(value: Any) -> bool:
    return value is Ellipsis or (isinstance(value, slice) and value == slice(None))


def view_step(node: Node, ndim: int | None) -> tuple[str, int | None] | None:
    """What ``node`` does to its first argument, a weight of ``ndim`` dims: ``("swap", ndim)`` for a
    transpose of the last two dims, ``("index", new_ndim)`` for indexing leading (expert) dims only,
    ``("same", ndim)`` for a view that changes nothing; None for anything else.  ``ndim`` may be None
    (unknown) after an index by a tensor of unknown rank; then only negative transpose dims are read."""
    target, args = node.target, node.args
    if not args or not isinstance(args[0], Node):
        return None
    lead = None if ndim is None else ndim - 2  # dims before the matrix ones
    if node.op == "call_method":
        if target == "t":
            return ("swap", ndim) if ndim == 2 else None
        if target in ("transpose", "swapaxes", "swapdims") and len(args) == 3:
            return ("swap", ndim) if _swaps_last_two(args[1], args[2], ndim) else None
        if target == "permute":
            perm = _dims(args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
            kind = _permute_kind(perm, ndim)
            return (kind, ndim) if kind else None
        if target == "contiguous":
            return ("same", ndim)
        if target == "select" and len(args) == 3 and isinstance(args[1], int) and lead and args[1] % ndim < lead:
            return ("index", ndim - 1)
        if target == "index_select" and len(args) == 3 and isinstance(args[1], int) and lead and args[1] % ndim < lead:
            return ("index", ndim)
        return None
    if node.op != "call_function":
        return None
    if target is getattr and len(args) == 2:
        if args[1] == "mT":
            return ("swap", ndim)
        if args[1] == "T":
            return ("swap", ndim) if ndim == 2 else None
        return None
    if target in (torch.t, aten.t.default, aten.numpy_T.default):
        return ("swap", ndim) if ndim == 2 else None
    if target is aten.mT.default:
        return ("swap", ndim)
    if target in (torch.transpose, aten.transpose.int, torch.swapaxes, torch.swapdims, aten.swapaxes.default, aten.swapdims.default) and len(args) == 3:
        return ("swap", ndim) if _swaps_last_two(args[1], args[2], ndim) else None
    if target in (torch.permute, aten.permute.default) and len(args) == 2:
        kind = _permute_kind(_dims(args[1]), ndim)
        return (kind, ndim) if kind else None
    if target in (aten.alias.default, aten.contiguous.default):
        return ("same", ndim)
    if not lead:  # indexing below applies to the leading (expert) dims of a 3-D or larger weight
        return None
    if target in (torch.select, aten.select.int) and len(args) == 3 and isinstance(args[1], int):
        return ("index", ndim - 1) if args[1] % ndim < lead else None  # type: ignore[operator]
    if target in (torch.index_select, aten.index_select.default) and len(args) == 3 and isinstance(args[1], int):
        return ("index", ndim) if args[1] % ndim < lead else None  # type: ignore[operator]
    if target is aten.slice.Tensor and len(args) >= 2 and isinstance(args[1], int):
        return ("index", ndim) if args[1] % ndim < lead else None  # type: ignore[operator]
    if target is aten.index.Tensor and len(args) == 2 and isinstance(args[1], (list, tuple)) and len(args[1]) == 1:
        idx = args[1][0]
        idx_ndim = _val_ndim(idx)
        return ("index", None if idx_ndim is None else ndim - 1 + idx_ndim)  # type: ignore[operator]
    if target is operator.getitem and len(args) == 2:
        idx = args[1]
        parts = list(idx) if isinstance(idx, tuple) else [idx]
        if not parts or not all(_is_full_slice(p) for p in parts[1:]):
            return None
        first = parts[0]
        if isinstance(first, int):
            return ("index", ndim - 1)  # type: ignore[operator]
        if isinstance(first, Node):
            idx_ndim = _val_ndim(first)
            return ("index", None if idx_ndim is None else ndim - 1 + idx_ndim)  # type: ignore[operator]
        if isinstance(first, slice):
            return ("index", ndim)
        return None
    return None


@dataclass(frozen=True)
class WeightRead:
    """How an op's operand reads a parameter: the parameter's name, the view nodes between its
    ``get_attr`` and the operand (in order), whether they swap its last two dims, and whether they index
    its leading (expert) dims."""

    param: str
    views: tuple[Node, ...]
    swapped: bool
    indexed: bool
    ndim: int  # the parameter's


def read_weight(gm: GraphModule, value: Any) -> WeightRead | None:
    """The :class:`WeightRead` when ``value`` is a parameter of ``gm`` read through recognised views
    (:func:`view_step`), else None."""
    chain: list[Node] = []
    cur = value
    while isinstance(cur, Node) and cur.op != "get_attr":
        if cur.op not in ("call_function", "call_method") or not cur.args or not isinstance(cur.args[0], Node):
            return None
        chain.append(cur)
        cur = cur.args[0]
        if len(chain) > 8:
            return None
    if not isinstance(cur, Node):
        return None
    try:
        param = get_parameter(gm, cur.target)  # type: ignore[arg-type]
    except AttributeError:
        return None
    if not isinstance(param, nn.Parameter):
        return None
    ndim: int | None = param.dim()
    swapped = indexed = False
    for node in reversed(chain):
        step = view_step(node, ndim)
        if step is None:
            return None
        what, ndim = step
        swapped ^= what == "swap"
        indexed |= what == "index"
    return WeightRead(cur.target, tuple(reversed(chain)), swapped, indexed, param.dim())  # type: ignore[arg-type]


def weight_source(gm: GraphModule, value: Any) -> tuple[str, bool, Node | None] | None:
    """``(parameter name, transposed, outermost view node)`` when ``value`` reads a parameter of ``gm``
    directly (``get_attr``), or a 2-D parameter through transposes (``W.t()``, ``W.T``, ``aten.permute``...);
    else None."""
    read = read_weight(gm, value)
    if read is None or read.indexed or (read.views and read.ndim != 2):
        return None
    return read.param, read.swapped, (read.views[-1] if read.views else None)


@dataclass
class Candidate:
    """A place in the graph where a LoRA branch could go (or a module a rule may name that cannot)."""

    name: str
    kind: str | None  # "linear" | "embedding" | "conv" | "conv_transpose" | "experts", or None when fxlora cannot adapt it
    nodes: list[Node] = field(default_factory=list)  # the call nodes (one per call of the module)
    inputs: list[int | str | tuple[int, int]] = field(default_factory=list)  # where each call takes its branch input
    views: list[Node] = field(default_factory=list)  # views of the weight that feed the calls
    module: nn.Module | None = None
    module_type: type | None = None  # the model's own type for the module (type rules match it)
    names: tuple[str, ...] = ()  # every qualified name a rule may use for it
    weight: str = ""  # qualified name of the weight parameter in the graph module
    bias: str | None = None
    weight_shape: tuple[int, ...] = ()
    layout_from_graph: bool | None = None  # functional sites: True when the graph computes x @ W
    op: dict[str, Any] = field(default_factory=dict)
    owner: str = ""  # module path on which the LoRA parameters are registered
    prefix: str = ""  # attribute prefix of the LoRA parameters ("" or "<param>_")
    reason: str | None = None  # why it cannot be adapted
    type_name: str = ""
    custom_leaf: bool = False  # a leaf module that is not torch.nn's: its layout comes from the rule


def _module_names(root: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, mod in root.named_modules(remove_duplicate=False):
        if name:
            names[id(mod)].append(name)
    return names


def _is_torch_nn(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("torch.nn")


def _overrides_forward(mod: nn.Module, base: type) -> bool:
    """Whether ``mod``'s class (a subclass of torch.nn's ``base``) computes something else in forward()."""
    return type(mod).forward is not base.forward


def _classify_module(cand: Candidate, mod: nn.Module) -> None:
    cand.type_name = type(mod).__name__
    weight = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
        cand.reason = f"{cand.type_name} has uninitialized (lazy) parameters; run one forward pass before rewrite"
        return
    base = next((b for b in (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd) if isinstance(mod, b)), None)
    if base is not None and not _is_torch_nn(mod):
        own = next(c for c in type(mod).__mro__ if c.__module__.startswith("torch.nn"))
        if _overrides_forward(mod, own):
            cand.reason = (
                f"{cand.type_name} subclasses {own.__name__} but overrides forward(), and it is kept as a leaf, so "
                "fxlora cannot see what it computes; drop it from leaf_modules so that its ops are traced (fxlora "
                "then adapts the matmul it runs on its weight)"
            )
            return
    if isinstance(mod, nn.Linear):
        cand.kind = "linear"
    elif isinstance(mod, nn.Embedding):
        if mod.max_norm is not None:
            cand.reason = (
                "nn.Embedding with max_norm renormalizes its weight in place during forward, which an "
                "additive LoRA update cannot follow; set max_norm=None or leave this module out"
            )
            return
        cand.kind = "embedding"
        cand.op = {"padding_idx": mod.padding_idx, "scale_grad_by_freq": mod.scale_grad_by_freq, "sparse": mod.sparse}
    elif isinstance(mod, nn.modules.conv._ConvNd):
        if mod.transposed:
            cand.kind = "conv_transpose"
            cand.op = {
                "stride": tuple(mod.stride),
                "padding": tuple(mod.padding),  # type: ignore[arg-type]
                "output_padding": tuple(mod.output_padding),
                "dilation": tuple(mod.dilation),
                "groups": mod.groups,
            }
        else:
            cand.kind = "conv"
            cand.op = {
                "stride": tuple(mod.stride),
                "padding": mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                "dilation": tuple(mod.dilation),
                "groups": mod.groups,
                "padding_mode": mod.padding_mode,
                "reversed_padding": tuple(mod._reversed_padding_repeated_twice),
            }
    elif not _is_torch_nn(mod) and isinstance(weight, nn.Parameter) and weight.dim() == 2 and not list(mod.children()):
        cand.kind = "linear"  # a custom leaf like GPT-2's Conv1D: layout from the rule
        cand.custom_leaf = True
    else:
        params = [n for n, _ in mod.named_parameters(recurse=False)]
        held = f" (it holds {', '.join(params[:4])})" if params else ""
        cand.reason = f"{cand.type_name} is not a module kind fxlora adapts{held}"
        return
    if not isinstance(weight, nn.Parameter):
        cand.kind, cand.reason = None, f"{cand.type_name} has no weight parameter"
        return
    cand.weight_shape = tuple(weight.shape)
    bias = getattr(mod, "bias", None)
    cand.bias = f"{cand.name}.bias" if isinstance(bias, nn.Parameter) else None


def _registered_child(mod: nn.Module, item: str) -> nn.Module | None:
    """``getattr(mod, item)`` when that is a submodule found the way ``nn.Module.__getattr__`` finds it
    (registered, not shadowed by an instance or class attribute, nor by a parameter or buffer); else None,
    and the caller asks torch."""
    child = mod._modules.get(item)
    if child is None or item in mod.__dict__ or item in mod._parameters or item in mod._buffers or hasattr(type(mod), item):
        return None
    return child


def _walk(root: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` found through the registries alone, or None where torch must be asked."""
    found = _FOUND.get()
    if found is not None:
        known = found.get((id(root), path))
        if known is not None and known[0] is root:
            return known[1]
    mod = root
    for item in path.split(".") if path else ():
        child = _registered_child(mod, item)
        if child is None:
            return None
        mod = child
    if found is not None:
        found[(id(root), path)] = (root, mod)
    return mod


#: (id(root), path) -> (root, the module at path), while :func:`modules_unchanged` holds
_FOUND: contextvars.ContextVar[dict[tuple[int, str], tuple[nn.Module, nn.Module]] | None] = contextvars.ContextVar(
    "fxlora_modules_found", default=None
)


@contextlib.contextmanager
def modules_unchanged() -> Iterator[None]:
    """A block that adds, removes or replaces no module: in it, a module found at a path is remembered, and
    the lookups of this module (:func:`get_submodule`, :func:`get_parameter`, :func:`get_buffer`) walk each
    path once (a plan looks the same paths up for every site: weight, bias, owner, ties).  Parameters and
    buffers are still read from their module's registry at every lookup."""
    if _FOUND.get() is not None:
        yield
        return
    token = _FOUND.set({})
    try:
        yield
    finally:
        _FOUND.reset(token)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``: the same module or the same AttributeError, found through the module
    registries directly (torch's walks ``hasattr`` then ``getattr`` per name, each through
    ``nn.Module.__getattr__``; plans look modules and parameters up thousands of times)."""
    mod = _walk(root, path)
    return root.get_submodule(path) if mod is None else mod


def get_parameter(root: nn.Module, target: str) -> nn.Parameter:
    """``root.get_parameter(target)``: the same parameter or the same AttributeError (see :func:`get_submodule`)."""
    return _registered(root, target, "_parameters", nn.Parameter, root.get_parameter)


def get_buffer(root: nn.Module, target: str) -> torch.Tensor:
    """``root.get_buffer(target)``: the same buffer or the same AttributeError (see :func:`get_submodule`)."""
    return _registered(root, target, "_buffers", torch.Tensor, root.get_buffer)


def _registered(root: nn.Module, target: str, registry: str, kind: type, lookup: Callable[[str], Any]) -> Any:
    """The ``kind`` registered in ``registry`` at ``target``; torch's own ``lookup`` where an attribute of the
    same name could shadow it, or there is none (its result or its error)."""
    path, _, name = target.rpartition(".")
    mod = _walk(root, path)
    value = None if mod is None else mod.__dict__[registry].get(name)
    if not isinstance(value, kind) or name in mod.__dict__ or hasattr(type(mod), name):
        return lookup(target)
    return value


def try_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)``, or None when there is no module there."""
    try:
        return get_submodule(root, path)
    except AttributeError:
        return None


def _owner_of(gm: GraphModule, root: nn.Module, node: Node, wname: str, param: nn.Parameter) -> tuple[str, str]:
    """The module that owns a functional site's weight, and the weight's attribute name there.

    torch.export graphs record the module that ran each op in ``nn_module_stack``; when that module
    holds the weight (by identity: a tied weight may be read under another name), the site is named
    after it, so the same rule text selects the same sites whichever way the model was captured.
    Otherwise the weight's own path decides (``blocks.0.fc.weight`` -> ``blocks.0.fc``); ``param`` is the
    weight, ``get_parameter(gm, wname)``.
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        for path, _ in reversed(list(stack.values())):  # innermost first
            mod = try_submodule(root, path) if isinstance(path, str) else None
            if mod is not None:
                for attr, p in mod._parameters.items():
                    if p is param:
                        return path, attr
    owner, _, attr = wname.rpartition(".")
    return owner, attr


def _tuple(value: Any, default: int, ndim: int) -> Any:
    if isinstance(value, str):
        return value
    value = default if value is None else value
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * ndim


def _where(node: Node, x: Node) -> int | str | tuple[int, int]:
    """Where ``node`` takes ``x``: its position in ``node.args``, its keyword, or ``(i, j)`` for item j
    of the list argument i (``aten.einsum``'s operands)."""
    for i, a in enumerate(node.args):
        if a is x:
            return i
    for i, a in enumerate(node.args):
        if isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if b is x:
                    return (i, j)
    return next(k for k, v in node.kwargs.items() if v is x)


def _new_candidate(gm: GraphModule, node: Node, root: nn.Module, module_types: dict[str, type], wname: str) -> Candidate:
    """A functional candidate for ``node`` reading parameter ``wname``, named after the weight's owner."""
    param = get_parameter(gm, wname)
    owner, attr = _owner_of(gm, root, node, wname, param)
    module = try_submodule(root, owner) if owner else None
    if attr == "weight" and owner:
        name, prefix = owner, ""
    else:
        name, prefix = (f"{owner}.{attr}" if owner else attr), f"{attr}_"
    cand = Candidate(name=name, kind=None, names=(name,), weight=wname, owner=owner, prefix=prefix, module=module if prefix == "" else None)
    # a type rule selects the sites whose weight belongs to a module of that type
    cand.module_type = module_types.get(owner, type(module) if module is not None else None) if owner else None
    cand.weight_shape = tuple(param.shape)
    cand.type_name = op_name(node.target)
    cand.nodes = [node]
    return cand


def _module_bias(gm: GraphModule, cand: Candidate) -> str | None:
    """The bias of the module that owns a site's weight (``FalconLinear`` adds it after its matmul)."""
    if cand.prefix or not cand.owner or cand.module is None or not isinstance(getattr(cand.module, "bias", None), nn.Parameter):
        return None
    try:
        get_parameter(gm, f"{cand.owner}.bias")
    except AttributeError:
        return None
    return f"{cand.owner}.bias"


def _functional_candidate(
    gm: GraphModule, node: Node, root: nn.Module, module_types: dict[str, type]
) -> Candidate | None:
    site_op = SITE_OPS[node.target]  # type: ignore[index]
    args = op_arguments(node)
    source = weight_source(gm, args.get(site_op.weight))
    if source is None:
        return None
    wname, transposed, view = source
    weight = get_parameter(gm, wname)
    cand = _new_candidate(gm, node, root, module_types, wname)
    cand.views = [view] if view is not None else []
    x = args.get(site_op.input)
    if not isinstance(x, Node):
        cand.reason = f"{cand.type_name} reads no tensor computed in the graph as its input"
        return cand
    cand.inputs = [_where(node, x)]
    if transposed and site_op.kind != "linear":
        cand.reason = f"{cand.type_name} reads a transposed view of its weight"
        return cand
    for key, value in args.items():  # hyper-parameters computed in the graph cannot be baked in
        if key in site_op.data_args:
            continue
        computed: list[Node] = []
        map_arg(value, computed.append)  # a Node, or Nodes inside a list (symbolic sizes)
        if not computed:
            continue
        names = ", ".join(n.name for n in computed)
        if key == "output_padding":
            cand.reason = (
                f"{cand.type_name} computes its output_padding in the graph from the input's shape ({names}): "
                "nn.ConvTranspose called with output_size under torch.export's dynamic shapes, which fxlora does not "
                "adapt. Capture with static shapes (capture='export', dynamic_shapes=None: output_padding is then "
                "fixed by the example inputs), or call the module without output_size and set its output_padding"
            )
        else:
            cand.reason = f"{cand.type_name} has an argument computed in the graph ({key}={names})"
        return cand
    if site_op.kind == "linear":
        if weight.dim() != 2:
            return None  # a 3-D weight read whole: an experts site, if anything (see _experts_candidate)
        if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
            cand.reason = "torch.addmm with beta or alpha other than 1"
            return cand
        cand.kind = "linear"
        cand.layout_from_graph = site_op.computes_x_at_w != transposed  # True: the weight is stored (in, out)
    elif site_op.kind == "embedding":
        if args.get("max_norm") is not None:
            cand.reason = "F.embedding with max_norm renormalizes its weight in place during forward"
            return cand
        cand.kind = "embedding"
        padding_idx = args.get("padding_idx")
        cand.op = {
            "padding_idx": None if padding_idx is None or padding_idx < 0 else padding_idx,
            "scale_grad_by_freq": bool(args.get("scale_grad_by_freq", False)),
            "sparse": bool(args.get("sparse", False)),
        }
    else:
        ndim = weight.dim() - 2
        cand.op = {
            "stride": _tuple(args.get("stride"), 1, ndim),
            "padding": _tuple(args.get("padding"), 0, ndim),
            "dilation": _tuple(args.get("dilation"), 1, ndim),
            "groups": int(args.get("groups") or 1),
        }
        if site_op.kind == "conv_transpose" or args.get("transposed"):
            cand.kind = "conv_transpose"
            cand.op["output_padding"] = _tuple(args.get("output_padding"), 0, ndim)
            if isinstance(cand.op["padding"], str):
                cand.kind, cand.reason = None, f"{cand.type_name} with padding={cand.op['padding']!r}"
                return cand
        else:
            cand.kind = "conv"
            cand.op["padding_mode"] = "zeros"
    if site_op.bias is not None:
        bias = weight_source(gm, args.get(site_op.bias))
        cand.bias = bias[0] if bias is not None and not bias[1] else None
    elif cand.kind == "linear":
        cand.bias = _module_bias(gm, cand)
    return cand


# --------------------------------------------------------------------------------------------- #
# MoE experts: a 3-D weight read per expert by a matmul-family op
# --------------------------------------------------------------------------------------------- #


def _einsum_role(args: dict[str, Any], gm: GraphModule) -> tuple[MatmulRole, WeightRead, str | None] | None:
    """The role of the parameter operand of a two-operand einsum, its read, and why it cannot be adapted
    (None when it can)."""
    equation, operands = args.get("equation"), args.get("operands") or []
    if not isinstance(equation, str) or len(operands) != 2:
        return None
    for w_pos in (0, 1):
        read = read_weight(gm, operands[w_pos])
        if read is None:
            continue
        role = MatmulRole(f"operands[{w_pos}]", f"operands[{1 - w_pos}]", -1)
        eq = equation.replace(" ", "")
        if "->" not in eq or "." in eq:
            return role, read, "an einsum without an explicit output or with '...' on the weight"
        lhs, out = eq.split("->")
        subs = lhs.split(",")
        if len(subs) != 2:
            return None
        w_subs, x_subs = subs[w_pos], subs[1 - w_pos]
        if len(w_subs) < 2:
            return role, read, "an einsum reading its weight as a vector"
        a, b = w_subs[-2], w_subs[-1]
        ins = [c for c in (a, b) if c in x_subs and c not in out]
        outs = [c for c in (a, b) if c in out and c not in x_subs]
        batch_ok = all(c in x_subs and c in out for c in w_subs[:-2])
        if len(ins) != 1 or len(outs) != 1 or not batch_ok:
            return role, read, f"an einsum ({equation}) that does not contract one weight dim with the input"
        if x_subs.replace(ins[0], outs[0]) != out:
            return role, read, f"an einsum ({equation}) whose output is not laid out like its input"
        return MatmulRole(role.weight, role.input, -1 if b == ins[0] else -2), read, None
    return None


def _matmul_read(gm: GraphModule, node: Node, args: dict[str, Any]) -> tuple[MatmulRole, WeightRead, str | None] | None:
    """The role and read of a matmul-family op's parameter operand, and why it cannot be adapted."""
    if node.target in _EINSUM:
        return _einsum_role(args, gm)
    roles = _matmul_roles(node.target)
    for role in roles or ():
        read = read_weight(gm, args.get(role.weight))
        if read is not None:
            return role, read, None
    return None


def _operand(args: dict[str, Any], name: str) -> Any:
    if name.startswith("operands["):
        return args["operands"][int(name[len("operands[") : -1])]
    return args.get(name)


def _experts_candidate(
    gm: GraphModule, node: Node, root: nn.Module, module_types: dict[str, type]
) -> Candidate | None:
    """A candidate for a matmul-family op that reads a 3-D parameter per expert (or a 2-D one on the
    left, which fxlora does not adapt: a candidate with a reason)."""
    args = op_arguments(node)
    found = _matmul_read(gm, node, args)
    if found is None:
        return None
    role, read, why = found
    if read.ndim < 2:
        return None
    einsum = node.target in _EINSUM
    if read.ndim == 2 and not einsum and role.weight != "input" and node.target in SITE_OPS:
        return None  # x @ W / F.linear(x, W) on a 2-D weight: a linear site (see _functional_candidate)
    cand = _new_candidate(gm, node, root, module_types, read.param)
    cand.views = list(read.views)
    x = _operand(args, role.input)
    if not isinstance(x, Node):
        cand.reason = f"{cand.type_name} reads no tensor computed in the graph as its input"
        return cand
    cand.inputs = [_where(node, x)]
    if why is not None:
        cand.reason = why
        return cand
    if read.ndim == 2:
        if einsum:
            cand.reason = f"{cand.type_name} on a 2-D weight (write it as F.linear(x, W) or x @ W to adapt it)"
        elif role.weight == "input":
            cand.reason = f"{cand.type_name} reads its 2-D weight as the left operand (W @ x)"
        else:
            cand.reason = f"{cand.type_name} reads a 2-D weight as a batched operand"
        return cand
    if read.ndim != 3:
        cand.reason = f"{cand.type_name} reads a {read.ndim}-D weight; fxlora adapts 3-D expert weights (experts, out, in)"
        return cand
    param_in_dim = role.in_dim if not read.swapped else (-1 if role.in_dim == -2 else -2)
    cand.kind = "experts"
    cand.layout_from_graph = param_in_dim == -2  # True: stored (experts, in, out)
    if node.target in _GROUPED_MM:  # its kernels need every stride a multiple of 16 bytes, the rank's too
        cand.op = {"align_bytes": 16}
    return cand


# --------------------------------------------------------------------------------------------- #
# Finding the candidates
# --------------------------------------------------------------------------------------------- #


def find_candidates(
    gm: GraphModule, root: nn.Module | None = None, module_types: dict[str, type] | None = None
) -> list[Candidate]:
    """Every call site in ``gm`` that a rule may select, in graph order, one per module or weight *use*.

    ``root`` is the module tree the graph was captured from (for qualified names, aliases and types);
    it defaults to ``gm`` itself.  ``module_types`` (qualified name -> type, recorded at capture) gives
    the model's own types where ``root`` holds plain containers (a torch.export graph module).  Nodes
    that fxlora added (LoRA branches) are never candidates.
    """
    root = gm if root is None else root
    module_types = module_types or {}
    aliases = _module_names(root)
    by_key: dict[tuple[Any, ...], Candidate] = {}
    ops: dict[int, tuple[bool, bool]] = {}  # id(target) -> _op_kinds(target), for the targets of gm's nodes
    for node in gm.graph.nodes:
        info = node_info(node)
        if info is not None and info["role"] != BASE:
            continue
        if node.op == "call_module":
            key: tuple[Any, ...] = ("module", node.target)
            if key not in by_key:
                mod = get_submodule(gm, node.target)
                original = try_submodule(root, node.target) or mod
                names = tuple(dict.fromkeys([node.target, *aliases.get(id(original), [])]))
                cand = Candidate(name=node.target, kind=None, module=mod, names=names, owner=node.target)
                _classify_module(cand, mod)
                cand.module_type = module_types.get(node.target, type(original))
                cand.weight = f"{node.target}.weight" if cand.kind else ""
                by_key[key] = cand
            cand = by_key[key]
            x = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
            if cand.kind and not isinstance(x, Node):
                cand.kind, cand.reason = None, f"{cand.type_name} is called without a tensor input"
            if cand.kind == "conv_transpose" and (len(node.args) > 1 or node.kwargs):
                cand.kind, cand.reason = None, (
                    f"{cand.type_name} is called with output_size, which sets output_padding from the input's "
                    "shape at run time; fxlora adapts transposed convolutions called with their input alone, or "
                    "called with output_size in a torch.export capture with static shapes (example_inputs=(...), "
                    "capture='export', dynamic_shapes=None)"
                )
            cand.nodes.append(node)
            cand.inputs.append(0 if node.args else next(iter(node.kwargs), ""))
            continue
        if node.op != "call_function":
            continue
        site_op, matmul = ops.get(id(node.target)) or ops.setdefault(id(node.target), _op_kinds(node.target))
        fc = None
        if site_op:
            fc = _functional_candidate(gm, node, root, module_types)
        if fc is None and matmul:
            fc = _experts_candidate(gm, node, root, module_types)
        if fc is None:
            continue
        if fc.kind == "experts" or (fc.kind is None and fc.weight_shape and len(fc.weight_shape) == 3):
            key = ("experts", fc.weight)
        else:
            key = ("function", fc.name, fc.kind, fc.layout_from_graph)
        if key in by_key:
            known = by_key[key]
            known.nodes.extend(fc.nodes)
            known.inputs.extend(fc.inputs)
            known.views.extend(fc.views)
            if known.kind == "experts" and (fc.kind != "experts" or fc.layout_from_graph != known.layout_from_graph):
                known.kind = None
                known.reason = fc.reason or (
                    f"its calls read the weight in different layouts ({known.type_name} and {fc.type_name})"
                )
        else:
            by_key[key] = fc
    candidates = list(by_key.values())
    _add_holder_names(gm, root, candidates)
    return candidates


def _op_kinds(target: Any) -> tuple[bool, bool]:
    """Whether a ``call_function`` node of ``target`` may be a functional site, and an experts site."""
    return target in SITE_OPS, _matmul_roles(target) is not None or target in _EINSUM


def _add_holder_names(gm: GraphModule, root: nn.Module, candidates: list[Candidate]) -> None:
    """Let a rule name a site by any module that holds its weight (by identity), under any of its names:
    T5's ``shared`` holds the weight that ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``
    read, so ``Rule("shared")`` selects those uses (and, the weight being tied, adapts it at every use)."""
    holders: dict[int, list[str]] = defaultdict(list)
    for path, mod in root.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                name = path if attr == "weight" and path else (f"{path}.{attr}" if path else attr)
                holders[id(p)].append(name)
    for cand in candidates:
        if not cand.weight:
            continue
        try:
            param = get_parameter(gm, cand.weight)
        except AttributeError:
            continue
        cand.names = tuple(dict.fromkeys([*cand.names, *holders.get(id(param), ())]))


# --------------------------------------------------------------------------------------------- #
# What a per-call kind needs from one call
# --------------------------------------------------------------------------------------------- #


def bind_call(gm: GraphModule, spec: SiteSpec, node: Node, A: Proxy, B: Proxy) -> Call | None:
    """The :class:`~fxlora.lora.Call` of ``node`` (a call of ``spec``'s site) for a ``per_call`` kind, with
    the site's factor proxies ``A`` and ``B``; None for the other kinds.

    For an experts site, ``apply`` and ``view`` record new nodes (at the graph's current insertion point)
    that call ``node``'s own op and replay the views between the weight's ``get_attr`` and ``node``,
    reusing the same index, offset and expert-id nodes.
    """
    if spec.kind == "tied":
        return Call(use=spec.op["uses"][node.name], factors=(A, B))
    if spec.kind != "experts":
        return None
    tracer = A.tracer
    graph = gm.graph
    args = op_arguments(node)
    found = _matmul_read(gm, node, args)
    assert found is not None and found[1].param == spec.weight, node.format_node()
    role, read, _ = found
    operand = _operand(args, role.weight)
    x_node = _operand(args, role.input)
    dropped = {args[name] for name in role.drop if isinstance(args.get(name), Node)}

    def view(t: Proxy) -> Proxy:
        cur = t.node
        for v in read.views:
            cur = graph.create_node(v.op, v.target, (cur, *v.args[1:]), dict(v.kwargs))
        return Proxy(cur, tracer)

    def apply(x: Proxy, w: Proxy) -> Proxy:
        def sub(n: Node) -> Any:
            if n is x_node:
                return x.node
            if n is operand:
                return w.node
            return None if n in dropped else n

        new = graph.create_node(node.op, node.target, map_arg(node.args, sub), map_arg(node.kwargs, sub))
        return Proxy(new, tracer)

    return Call(apply=apply, view=view)
