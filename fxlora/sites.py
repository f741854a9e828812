"""Candidate sites: every place in a captured graph where a LoRA branch could go.

This module owns *finding* sites and describing them (:class:`Candidate`); which rule selects which
candidate is :mod:`fxlora.resolution`'s job, and whether a weight is read elsewhere is
:mod:`fxlora.ties`'.  Candidates are:

* ``call_module`` nodes of ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d/2d/3d``, and of custom leaf
  modules with a 2-D ``weight`` parameter (``x @ W.T + b``, or ``x @ W + b`` with ``fan_in_fan_out``);
* ``call_function`` nodes whose weight argument reads a parameter (directly, or through a transpose:
  ``W.t()``, ``W.T``, ``W.transpose(0, 1)``, ``aten.t`` / ``aten.permute``), at the torch level and the
  ATen level: ``F.linear``, ``torch.addmm``, ``x @ W`` / ``torch.matmul`` / ``torch.mm`` (the layout,
  ``fan_in_fan_out``, is read from the graph), ``F.embedding`` and ``F.conv1d/2d/3d``.  Such a site is
  named after the module that owns its weight (``node.meta["nn_module_stack"]`` in torch.export graphs)
  or after the weight (``blocks.0.fc.weight`` -> site ``blocks.0.fc``; a parameter not called
  ``weight`` keeps its full name, ``blocks.0.w1``).

Op arguments are read by name through torch's own schema normalisation
(:func:`torch.fx.operator_schemas.normalize_function`), not through hand-written signature tables.
"""

from __future__ import annotations

import operator
import typing
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

from .provenance import BASE, node_info

__all__ = [
    "Candidate",
    "SiteOp",
    "SITE_OPS",
    "SUPPORTED",
    "find_candidates",
    "op_arguments",
    "weight_source",
    "try_submodule",
]

aten = torch.ops.aten

SUPPORTED = (
    "nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, leaf modules with a 2-D weight, and F.linear / torch.addmm / "
    "x @ W / F.embedding / F.conv1d/2d/3d calls on a parameter"
)


@dataclass(frozen=True)
class SiteOp:
    """How one functional op is adapted: its kind and the names of its arguments."""

    kind: str  # "linear" | "embedding" | "conv"
    weight: str  # the weight argument
    input: str  # the argument the branch reads
    bias: str | None = None  # the bias argument, if the op has one
    computes_x_at_w: bool = False  # linear: True for x @ W (weight stored (in, out)), False for F.linear

    @property
    def data_args(self) -> frozenset[str]:
        """Arguments that may be computed in the graph (the others are hyper-parameters to bake in)."""
        return frozenset(a for a in (self.weight, self.input, self.bias) if a)


_LINEAR = SiteOp("linear", "weight", "input", "bias")
_ADDMM = SiteOp("linear", "mat2", "mat1", "input", computes_x_at_w=True)
_MATMUL = SiteOp("linear", "other", "input", computes_x_at_w=True)
_MM = SiteOp("linear", "mat2", "input", computes_x_at_w=True)
_CONV = SiteOp("conv", "weight", "input", "bias")

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
    aten.convolution.default: _CONV,
}


def _arg_type(value: Any) -> Any:
    if isinstance(value, (Node, torch.Tensor)):
        return torch.Tensor
    if isinstance(value, (list, tuple)):
        return typing.List[int]
    return type(value)


def op_arguments(node: Node) -> dict[str, Any]:
    """The arguments of a ``call_function`` node by name, defaults filled in, read through the op's schema
    (``operator.matmul``, which has none, is ``(input, other)``)."""
    if node.target is operator.matmul:
        return {"input": node.args[0], "other": node.args[1]}
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


# Views that transpose a 2-D weight, at the torch level and the ATen level.
def _is_transpose(node: Node) -> bool:
    if node.op == "call_method" and node.target == "t":
        return True
    if node.op == "call_method" and node.target in ("transpose", "swapaxes", "swapdims"):
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1] if len(node.args) == 3 else False
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
        return [int(d) % 2 for d in dims] == [1, 0]
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) == 2 and node.args[1] in ("T", "mT")
    if node.target in (torch.t, aten.t.default, aten.numpy_T.default):
        return True
    if node.target in (torch.transpose, aten.transpose.int):
        return len(node.args) == 3 and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    if node.target in (torch.permute, aten.permute.default):
        return [int(d) % 2 for d in node.args[1]] == [1, 0]
    return False


def weight_source(gm: GraphModule, value: Any) -> tuple[str, bool, Node | None] | None:
    """``(parameter name, transposed, view node)`` when ``value`` reads a parameter of ``gm`` directly
    (``get_attr``) or through one transpose, else None."""
    if not isinstance(value, Node):
        return None
    view = None
    if value.op != "get_attr" and _is_transpose(value) and isinstance(value.args[0], Node):
        view, value = value, value.args[0]
    if value.op != "get_attr":
        return None
    try:
        param = gm.get_parameter(value.target)  # type: ignore[arg-type]
    except AttributeError:
        return None
    if not isinstance(param, nn.Parameter) or (view is not None and param.dim() != 2):
        return None
    return value.target, view is not None, view  # type: ignore[return-value]


@dataclass
class Candidate:
    """A place in the graph where a LoRA branch could go (or a module a rule may name that cannot)."""

    name: str
    kind: str | None  # "linear" | "embedding" | "conv", or None when fxlora cannot adapt it
    nodes: list[Node] = field(default_factory=list)  # the call nodes (one per call of the module)
    inputs: list[int | str] = field(default_factory=list)  # where each call takes its branch input (arg index or kwarg)
    views: list[Node] = field(default_factory=list)  # transposes of the weight that feed the calls
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


def _classify_module(cand: Candidate, mod: nn.Module) -> None:
    cand.type_name = type(mod).__name__
    weight = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
        cand.reason = f"{cand.type_name} has uninitialized (lazy) parameters; run one forward pass before rewrite"
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
            cand.reason = f"{cand.type_name} is a transposed convolution, which fxlora does not adapt"
            return
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
        cand.reason = f"{cand.type_name} is not a module kind fxlora adapts"
        return
    if not isinstance(weight, nn.Parameter):
        cand.kind, cand.reason = None, f"{cand.type_name} has no weight parameter"
        return
    cand.weight_shape = tuple(weight.shape)
    bias = getattr(mod, "bias", None)
    cand.bias = f"{cand.name}.bias" if isinstance(bias, nn.Parameter) else None


def try_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)``, or None when there is no module there."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _owner_of(gm: GraphModule, root: nn.Module, node: Node, wname: str) -> tuple[str, str]:
    """The module that owns a functional site's weight, and the weight's attribute name there.

    torch.export graphs record the module that ran each op in ``nn_module_stack``; when that module
    holds the weight (by identity: a tied weight may be read under another name), the site is named
    after it, so the same rule text selects the same sites whichever way the model was captured.
    Otherwise the weight's own path decides (``blocks.0.fc.weight`` -> ``blocks.0.fc``).
    """
    param = gm.get_parameter(wname)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
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


def _functional_candidate(
    gm: GraphModule, node: Node, root: nn.Module, module_types: dict[str, type]
) -> Candidate | None:
    site_op = SITE_OPS[node.target]  # type: ignore[index]
    args = op_arguments(node)
    source = weight_source(gm, args.get(site_op.weight))
    if source is None:
        return None
    wname, transposed, view = source
    weight = gm.get_parameter(wname)
    owner, attr = _owner_of(gm, root, node, wname)
    if attr == "weight" and owner:
        name, prefix = owner, ""
        module = try_submodule(root, owner)  # for type rules: the layer that owns the weight
    else:
        name, prefix, module = (f"{owner}.{attr}" if owner else attr), f"{attr}_", None
    cand = Candidate(name=name, kind=None, names=(name,), weight=wname, owner=owner, prefix=prefix, module=module)
    if prefix == "":
        cand.module_type = module_types.get(owner, type(module) if module is not None else None)
    cand.weight_shape = tuple(weight.shape)
    cand.type_name = getattr(node.target, "__name__", str(node.target))
    cand.nodes = [node]
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
        if key not in site_op.data_args and isinstance(value, Node):
            cand.reason = f"{cand.type_name} has an argument computed in the graph ({key}={value.name})"
            return cand
    if site_op.kind == "linear":
        if weight.dim() != 2:
            cand.reason = f"{cand.type_name} with a {weight.dim()}-D weight is not a linear layer"
            return cand
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
        if args.get("transposed"):
            cand.reason = "a transposed convolution, which fxlora does not adapt"
            return cand
        ndim = weight.dim() - 2
        cand.kind = "conv"
        cand.op = {
            "stride": _tuple(args.get("stride"), 1, ndim),
            "padding": _tuple(args.get("padding"), 0, ndim),
            "dilation": _tuple(args.get("dilation"), 1, ndim),
            "groups": int(args.get("groups") or 1),
            "padding_mode": "zeros",
        }
    if site_op.bias is not None:
        bias = weight_source(gm, args.get(site_op.bias))
        cand.bias = bias[0] if bias is not None and not bias[1] else None
    return cand


def _where(node: Node, x: Node) -> int | str:
    """Where ``node`` takes ``x``: its position in ``node.args``, or its keyword."""
    for i, a in enumerate(node.args):
        if a is x:
            return i
    return next(k for k, v in node.kwargs.items() if v is x)


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
    for node in gm.graph.nodes:
        info = node_info(node)
        if info is not None and info["role"] != BASE:
            continue
        if node.op == "call_module":
            key: tuple[Any, ...] = ("module", node.target)
            if key not in by_key:
                mod = gm.get_submodule(node.target)
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
            cand.nodes.append(node)
            cand.inputs.append(0 if node.args else next(iter(node.kwargs), ""))
        elif node.op == "call_function" and node.target in SITE_OPS:
            fc = _functional_candidate(gm, node, root, module_types)
            if fc is None:
                continue
            key = ("function", fc.name, fc.kind, fc.layout_from_graph)
            if key in by_key:
                by_key[key].nodes.extend(fc.nodes)
                by_key[key].inputs.extend(fc.inputs)
                by_key[key].views.extend(fc.views)
            else:
                by_key[key] = fc
    return list(by_key.values())
