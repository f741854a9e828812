"""Causal-attention pass: a causal mask that a ``torch.export`` capture materialised becomes ``is_causal``.

A Hugging Face decoder called eagerly without padding passes ``attn_mask=None, is_causal=True`` to
``scaled_dot_product_attention`` and lets it share the key/value heads (``enable_gqa=True``).  Under
``torch.export`` it cannot decide that the mask is causal (the lengths are symbolic), so the captured
graph builds a ``[batch, 1, seq, seq]`` mask from ``arange``\\ s and repeats each key/value head
(``repeat_kv``: ``unsqueeze``, ``expand``, ``reshape``) before the attention.  Both cost: the masked
kernels are about twice as slow as the causal ones, and the repeated keys and values are saved for the
backward (about 30 MB per layer of a 1B Llama at 4096 tokens).

For each ``aten.scaled_dot_product_attention`` call with a mask and ``is_causal=False``, the pass
replaces the mask by ``is_causal=True`` when

* the mask is computed from the graph's *shapes* only: cut at the ``sym_size`` nodes, its ancestors
  read no placeholder, parameter, buffer or submodule, and no length that comes from data (an unbacked
  symbol: ``nonzero``, ``item``);
* its construction runs only what a position mask needs (:data:`_MASK_OPS`): an integer ``arange``, sums
  and differences, comparisons of integer or boolean tensors, logic, prefix sums, shapes, dtypes and
  fills, and reads each length only as a size, a dimension or an ``arange`` bound (never as a value it
  computes with, as in ``x < s // 2``): no products, quotients, reductions or random ops.  With these
  alone the mask's value at a query and key position does not depend on the length beyond those
  positions, and changes only where a position meets one of the construction's numbers; and
* evaluated on the CPU, it is the lower-triangular ``seq x seq`` mask (``True``, or ``0.0`` in an
  additive mask, on and below the diagonal; ``False`` or ``-inf`` above) at every length checked: 2, 3,
  5, 8, 17, 33, 65, ..., 1025, the two ends of the range torch.export allows the length (up to
  :data:`MAX_CHECKED_LENGTH`) and the lengths next to every number the construction uses (a sliding
  window of 4096 is checked at 4095 to 4097), each symbol in turn and the first few in every
  combination; and the query and key lengths are the same symbolic length.

A mask that depends on an input (``attention_mask``, ``position_ids``, ``cache_position``) is kept, and
so is one whose construction uses a number above :data:`MAX_CHECKED_LENGTH` or tensors larger than four
``seq x seq`` masks.  The check is evidence, not a proof: a construction that multiplies positions by
adding them to themselves could differ from the causal mask only past the lengths checked.  Where the
key and value are ``repeat_kv`` of tensors with fewer heads, the attention reads those instead with
``enable_gqa=True`` (which repeats each head in the same order).  The nodes that only served the mask and
the repeats are erased (with the dtype checks torch.export recorded on them); nothing else in the graph
changes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from fxlora.sites import op_arguments

from .infra import FxLoraPass, PassResult, check_contract, counters, finalize

__all__ = ["MAX_CHECKED_LENGTH", "CausalAttention", "causal_attention"]

#: the longest sequence the mask check evaluates (a mask built with a larger integer is kept)
MAX_CHECKED_LENGTH = 8192
_SAMPLE_LENGTHS = (2, 3, 5, 8, 17)
_SLICE_END = 2**62  # slice ends at or above this are torch.export's "to the end"
_MAX_EVALUATED_NUMEL = 4 * MAX_CHECKED_LENGTH**2  # a few masks' worth at the longest length checked

_aten = torch.ops.aten
_SDPA = _aten.scaled_dot_product_attention.default
_SYM_SIZE = {_aten.sym_size.int}
_ASSERTS = {_aten._assert_tensor_metadata.default}
_SYM_OPS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
            operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}


def _overloads(*names: str) -> frozenset[Any]:
    out = set()
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            out |= {getattr(packet, o) for o in packet.overloads()}
    return frozenset(out)


#: what a mask construction may run: positions (an integer ``arange``), their sums and differences,
#: comparisons, logic, prefix sums (transformers' packed-sequence test), shapes, dtypes and fills.  No
#: products, quotients or reductions: with these alone the mask's value at (i, j) does not depend on the
#: length beyond the positions, and changes only where a position meets one of the construction's numbers
_ARANGE = _overloads("arange")
_COMPARISONS = _overloads("lt", "le", "gt", "ge", "eq", "ne")
_MASK_OPS = _ARANGE | _COMPARISONS | _overloads(
    "add", "sub", "rsub", "neg",
    "__and__", "__or__", "__xor__", "__invert__", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not",
    "logical_and", "logical_or", "logical_xor", "logical_not",
    "diff", "cumsum",
    "unsqueeze", "squeeze", "expand", "view", "reshape", "_unsafe_view", "slice", "select", "index", "permute",
    "transpose", "t", "clone", "contiguous", "alias", "detach",
    "ones", "zeros", "full", "new_ones", "new_zeros", "new_full", "ones_like", "zeros_like", "full_like",
    "scalar_tensor", "masked_fill", "where",
    "to", "_to_copy", "type_as", "_assert_tensor_metadata", "sym_size",
)


def _dependencies(gm: GraphModule) -> tuple[nx.DiGraph, list[Node]]:
    """Edges from each node to its users, by position in the graph (``nodes[i]``), except into ``sym_size``
    nodes: a length read from a tensor does not depend on the tensor's values."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(nodes)))
    g.add_edges_from(
        (index[source], i)
        for i, node in enumerate(nodes)
        if not (node.op == "call_function" and node.target in _SYM_SIZE)
        for source in node.all_input_nodes
    )
    return g, nodes


def _numbers(values: Iterable[Any]) -> set[float]:
    """The finite ints and floats among ``values`` (nested), not bools."""
    found: set[float] = set()

    def visit(v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            found.add(v)
        return v

    for v in values:
        map_aggregate(v, visit)
    return found


def _expr(value: Any) -> Any:
    """The sympy expression of a SymInt, or the int itself."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return int(value) if isinstance(value, int) else None


class _MaskCheck:
    """Whether a mask node is the causal mask at every length, by the rules in the module docstring."""

    def __init__(self, gm: GraphModule) -> None:
        self.deps, self.nodes = _dependencies(gm)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.ranges = _shape_env_ranges(gm)
        self.known: dict[tuple[Node, Any], bool] = {}

    def subgraph(self, mask: Node) -> list[Node] | None:
        """The nodes that compute ``mask`` (in graph order), or None when they read more than shapes."""
        found = nx.ancestors(self.deps, self.index[mask]) | {self.index[mask]}
        nodes = [self.nodes[i] for i in sorted(found)]  # in graph order
        for n in nodes:
            if n.op != "call_function":
                return None  # a placeholder, parameter, buffer or submodule
            if n.target not in _MASK_OPS and n.target not in _SYM_OPS:
                return None
            if _unbacked(n.meta.get("val")):
                return None  # a length read from data (nonzero, item): not a shape
            if not _lengths_read_as_sizes(n):
                return None
            if n.target in _ARANGE and _val_dtype(n) is not None and (_val_dtype(n).is_floating_point or _val_dtype(n).is_complex):
                return None  # positions that round (bfloat16 is exact only to 256)
            if n.target in _COMPARISONS and any(
                _val_dtype(a) is not None and _val_dtype(a).is_floating_point for a in n.all_input_nodes
            ):
                return None
        return nodes

    def is_causal(self, mask: Node, query_len: Any) -> bool:
        key = (mask, query_len)
        if key not in self.known:
            self.known[key] = self._check(mask, query_len)
        return self.known[key]

    def _check(self, mask: Node, query_len: Any) -> bool:
        nodes = self.subgraph(mask)
        if nodes is None:
            return False
        leaves = [_expr(n.meta.get("val")) for n in nodes if n.target in _SYM_SIZE]
        if any(e is None for e in leaves) or query_len is None:
            return False
        symbols = set()
        for e in [*leaves, query_len]:
            symbols |= getattr(e, "free_symbols", set())
        constants = {c for c in _numbers(a for n in nodes for a in (n.args, n.kwargs)) if 2 <= abs(c) < _SLICE_END}
        if any(abs(c) > MAX_CHECKED_LENGTH for c in constants):
            return False
        near = {d + k for c in map(abs, constants) for d in {math.floor(c), math.ceil(c)} for k in (-1, 0, 1)}
        lengths = sorted(set(_SAMPLE_LENGTHS) | near)
        assignments = _assignments(sorted(symbols, key=str), lengths, self.ranges)
        if not assignments:
            return False  # no length the check could evaluate
        for assignment in assignments:
            try:
                if any(_numel_at(n, assignment) > _MAX_EVALUATED_NUMEL for n in nodes):
                    return False  # a construction larger than seq x seq masks: not evaluated, kept as it is
                value = self._evaluate(nodes, mask, assignment)
                n = int(query_len.xreplace(assignment)) if assignment else int(query_len)
            except Exception:  # noqa: BLE001 - a construction the check cannot run is kept as it is
                return False
            if not _is_causal_mask(value, n):
                return False
        return True

    def _evaluate(self, nodes: list[Node], mask: Node, assignment: dict[Any, Any]) -> Any:
        env: dict[Node, Any] = {}
        for n in nodes:
            if n.target in _SYM_SIZE:
                e = _expr(n.meta["val"])
                env[n] = int(e.xreplace(assignment)) if assignment and not isinstance(e, int) else int(e)
                continue
            if n.target in _ASSERTS:
                env[n] = None
                continue
            args = map_aggregate(n.args, lambda a: env[a] if isinstance(a, Node) else _on_cpu(a))
            kwargs = map_aggregate(n.kwargs, lambda a: env[a] if isinstance(a, Node) else _on_cpu(a))
            env[n] = n.target(*args, **kwargs)
        return env[mask]


def _numel_at(node: Node, assignment: dict[Any, Any]) -> int:
    """How many elements ``node``'s value has at the lengths ``assignment`` gives (0 for a number)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    total = 1
    for d in val.shape:
        e = _expr(d)
        total *= int(e.xreplace(assignment)) if assignment and not isinstance(e, int) else int(e)
    return total


def _val_dtype(node: Any) -> torch.dtype | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _unbacked(val: Any) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        return bool(free_unbacked_symbols(val))
    except Exception:  # noqa: BLE001 - a value torch cannot read symbols from: treat it as unknown
        return True


def _lengths_read_as_sizes(node: Node) -> bool:
    """Whether every length (SymInt) ``node`` reads is read as a size, a dimension or a position range
    (an integer ``arange``'s start, end or step), never as a value the mask computes with (``x < s // 2``,
    ``full((), s)``)."""
    if node.target in _SYM_OPS or node.target in _SYM_SIZE:
        return True  # arithmetic on lengths: its own result is checked where it is read
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        reads_length = False

        def visit(v: Any) -> Any:
            nonlocal reads_length
            if isinstance(v, Node) and isinstance(v.meta.get("val"), (torch.SymInt, int)) and not isinstance(v.meta.get("val"), bool):
                reads_length = True
            return v

        map_aggregate(value, visit)
        if not reads_length:
            continue
        kind = str(arg.type)
        if "int" in kind.lower() and "Scalar" not in kind:
            continue  # int, SymInt, int[], SymInt[] (optional or not): a size, a dimension, a slice bound
        if node.target in _ARANGE and arg.name in ("start", "end", "step"):
            continue
        return False
    return True


def _on_cpu(value: Any) -> Any:
    return torch.device("cpu") if isinstance(value, torch.device) else value


def _assignments(symbols: list[Any], lengths: list[int], ranges: dict[Any, tuple[int, int]]) -> list[dict[Any, Any]]:
    """The lengths to check: each symbol at each of ``lengths``, at 2^k + 1 up to 1025 and at the ends of
    its allowed range (up to :data:`MAX_CHECKED_LENGTH`), the others at their lowest allowed value of 3 or
    more; and every combination of the symbols' first few values (at most three symbols).  Only values
    within each symbol's allowed range are used: [] when a symbol has none."""
    import itertools

    import sympy

    if not symbols:
        return [{}]
    values: dict[Any, list[int]] = {}
    for sym in symbols:
        lo, hi = ranges.get(sym, (0, _SLICE_END))
        wanted = set(lengths) | {2**k + 1 for k in range(5, 11)} | {max(lo, 1)} | ({hi} if hi <= MAX_CHECKED_LENGTH else set())
        values[sym] = sorted(v for v in wanted if v >= 1 and lo <= v <= hi)
        if not values[sym]:
            return []
    base = {sym: next((v for v in values[sym] if v >= 3), values[sym][0]) for sym in symbols}
    out = [{s: (v if s is sym else base[s]) for s in symbols} for sym in symbols for v in values[sym]]
    if len(symbols) <= 3:
        out += [dict(zip(symbols, combo, strict=True)) for combo in itertools.product(*(values[s][:5] for s in symbols))]
    return [{s: sympy.Integer(v) for s, v in a.items()} for a in out]


def _is_causal_mask(value: Any, n: int) -> bool:
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[-2:]) != (n, n):
        return False
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if value.dtype == torch.bool:
        return bool((value == allowed).all())
    if value.is_floating_point():
        return bool(((value == 0) == allowed).all()) and bool((value[..., ~allowed] == float("-inf")).all() if n > 1 else True)
    return False


def _repeated_heads(node: Any) -> Node | None:
    """``x`` when ``node`` is ``repeat_kv(x)`` (``reshape(expand(unsqueeze(x, 2), [b, h, n, s, d]),
    [b, h * n, s, d])``, with identity slices allowed between), else None."""
    if not isinstance(node, Node) or node.target not in (_aten.reshape.default, _aten.view.default):
        return None
    expand = _skip_slices(node.args[0])
    if not isinstance(expand, Node) or expand.target is not _aten.expand.default:
        return None
    unsq = _skip_slices(expand.args[0])
    if not isinstance(unsq, Node) or unsq.target is not _aten.unsqueeze.default or unsq.args[1] != 2:
        return None
    source = _skip_slices(unsq.args[0])
    src, out = _val(source), _val(node)
    exp = _val(expand)
    if src is None or out is None or exp is None or src.dim() != 4 or exp.dim() != 5 or out.dim() != 4:
        return None
    b, h, s, d = (_expr(x) for x in src.shape)
    eb, eh, en, es, ed = (_expr(x) for x in exp.shape)
    ob, oh, os_, od = (_expr(x) for x in out.shape)
    if not (eb == b == ob and eh == h and es == s == os_ and ed == d == od and oh == h * en):
        return None
    if not isinstance(source, Node):
        return None
    return source


def _skip_slices(node: Any) -> Any:
    """Through ``aten.slice`` nodes that keep a whole dimension (``x[:, :]`` in the model's code)."""
    while isinstance(node, Node) and node.target is _aten.slice.Tensor:
        args = list(node.args) + [None] * (5 - len(node.args))
        _, _dim, start, end, step = args[:5]
        if start not in (None, 0) or (end is not None and not (isinstance(end, int) and end >= _SLICE_END)) or step not in (None, 1):
            return node
        node = node.args[0]
    return node


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _erase_unused(candidates: Iterable[Node]) -> int:
    """Erase the candidates nothing else uses, and the dtype checks on them, last first; return how many."""
    candidates = set(candidates)
    graph_order = [n for n in reversed(next(iter(candidates)).graph.nodes) if n in candidates] if candidates else []
    erased = 0
    for node in graph_order:
        users = list(node.users)
        if users and all(u.op == "call_function" and u.target in _ASSERTS for u in users):
            for u in users:
                u.graph.erase_node(u)
                erased += 1
        if not node.users:
            node.graph.erase_node(node)
            erased += 1
    return erased


class CausalAttention(FxLoraPass):
    """See the module docstring."""

    name = "causal_attention"

    def call(self, gm: GraphModule) -> PassResult:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _SDPA]
        if not calls:
            return PassResult(gm, False)
        check = _MaskCheck(gm)
        dead: list[Node] = []
        changed = 0
        for node in calls:
            a = op_arguments(node)
            mask, q, k, v = a["attn_mask"], a["query"], a["key"], a["value"]
            if not isinstance(mask, Node) or a["is_causal"] or a.get("enable_gqa"):
                continue
            qv, kv = _val(q), _val(k)
            if qv is None or kv is None or qv.dim() != 4 or _expr(qv.shape[-2]) != _expr(kv.shape[-2]):
                continue
            if not check.is_causal(mask, _expr(qv.shape[-2])):
                continue
            k0, v0 = _repeated_heads(k), _repeated_heads(v)
            gqa = k0 is not None and v0 is not None and _expr(_val(k0).shape[1]) == _expr(_val(v0).shape[1])
            new_k, new_v = (k0, v0) if gqa else (k, v)
            kwargs = {"scale": a["scale"]} if a["scale"] is not None else {}
            if gqa:
                kwargs["enable_gqa"] = True
            node.args = (q, new_k, new_v, None, a["dropout_p"], True)
            node.kwargs = kwargs
            dead += check.subgraph(mask) or []
            if gqa:
                dead += [k, v, *_chain(k, k0), *_chain(v, v0)]
            changed += 1
        if not changed:
            return PassResult(gm, False)
        counters[self.name]["attention_calls"] += changed
        counters[self.name]["nodes_erased"] += _erase_unused(dead)
        finalize(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is _SDPA:
                a = op_arguments(n)
                check_contract(not (a["is_causal"] and a["attn_mask"] is not None),
                               "causal_attention left an attention call with both a mask and is_causal")


def _chain(top: Node, bottom: Node) -> list[Node]:
    """The nodes from ``top`` down its first arguments to (not including) ``bottom``."""
    out = []
    node: Any = top
    while isinstance(node, Node) and node is not bottom:
        out.append(node)
        node = node.args[0] if node.args else None
    return out


def _shape_env_ranges(gm: GraphModule) -> dict[Any, tuple[int, int]]:
    """symbol -> (lowest, highest) value torch.export allows it, from the shape environment of the
    graph's example values."""
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        for x in (v.shape if isinstance(v, torch.Tensor) else (v,)):
            if isinstance(x, torch.SymInt):
                env = x.node.shape_env
                return {sym: (_bound(rng.lower, 0), _bound(rng.upper, _SLICE_END)) for sym, rng in env.var_to_range.items()}
    return {}


def _bound(value: Any, infinite: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return infinite  # torch's int_oo


def causal_attention(gm: GraphModule) -> PassResult:
    """Run :class:`CausalAttention` on ``gm`` (in place)."""
    return CausalAttention()(gm)
