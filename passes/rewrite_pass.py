"""Rewrite pass: add a LoRA side branch at every site of a plan.

For each planned site it registers ``lora_A`` / ``lora_B`` (and an ``nn.Dropout`` when the rule has
dropout) on the module that owns the site, then after every call node of the site inserts::

    a   = get_attr <site>.lora_A                       # role lora_A
    b   = get_attr <site>.lora_B                       # role lora_B
    xd  = call_module <site>.lora_dropout (x)          # role dropout, only with dropout > 0
    h   = ... the kind's shrink(xd, a) ...             # role shrink
    y   = ... the kind's expand(h, b) ...              # role expand
    out = add(base_out, y)                             # role add

and redirects the users of ``base_out`` to ``out``.  The math is recorded from :mod:`fxlora.lora` by
calling it on proxies, once per spec less its names; the other sites of that spec replay the recorded
``create_node`` calls on their own nodes (:class:`Recordings`).  A module called several times gets one pair of parameters read by every
call's branch.  Every created node gets the base node's ``nn_module_stack`` and ``stack_trace`` and
``meta["fxlora"]`` (see :mod:`fxlora.provenance`); the site's spec is recorded on the module.

The pass is idempotent: a site already adapted for the plan's adapter is left alone, so it reports
``modified=False`` when run again.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.fx import GraphModule, Node, Proxy
from torch.fx.node import map_arg
from torch.fx.proxy import GraphAppendingTracer

from fxlora import provenance
from fxlora.lora import SiteSpec, init_factors, kind_of
from fxlora.resolution import Plan
from fxlora.sites import bind_call, get_parameter

from .infra import FxLoraPass, PassResult, check_contract, counters, create_node_again, finalize, module_at
from .train_modules import register_copies, retarget, trained_by

__all__ = ["RewritePass", "rewrite", "add_branch", "input_of", "Recordings"]

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


class RewritePass(FxLoraPass):
    """Apply a :class:`~fxlora.resolution.Plan` made for this graph (see the module docstring).

    With ``activate=False`` the adapter's parameters are registered and its sites recorded, but no branch
    is added: the adapter is inactive (``fxlora.add_adapter``) until ``SetActiveAdapters`` adds it.
    """

    name = "rewrite"

    def __init__(self, plan: Plan, activate: bool = True) -> None:
        super().__init__()
        self.plan = plan
        self.activate = activate

    def requires(self, gm: GraphModule) -> None:
        super().requires(gm)
        why = self.plan.mismatch(gm)
        check_contract(why is None, f"the plan was made for another graph: {why}")

    def call(self, gm: GraphModule) -> PassResult:
        done = provenance.graph_sites(gm, self.plan.adapter)
        todo = [site for site in self.plan.sites if site.name not in done]
        trained = [p for p in self.plan.train_modules if p not in trained_by(gm).get(self.plan.adapter, {})]
        if not todo and not trained:
            return PassResult(gm, False)
        nodes = {n.name: n for n in gm.graph.nodes}
        recordings = Recordings()
        for site in todo:
            _add_parameters(gm, site.spec)
            for call, where in site.calls:
                if self.activate:
                    add_branch(gm, site.spec, nodes[call], where, recordings)
                else:
                    provenance.tag_base(nodes[call], site.name, where)
            provenance.record_site(gm, site.spec, active=self.activate)
        if trained:
            register_copies(gm, self.plan.adapter, trained)
            if self.activate:
                retarget(gm, [self.plan.adapter])
        counters[self.name]["sites"] += len(todo)
        finalize(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        recorded = provenance.graph_sites(gm, self.plan.adapter)
        for site in self.plan.sites:
            check_contract(site.name in recorded, f"site '{site.name}' was not recorded")
        if not self.activate:
            return
        # the adds this pass makes are operator.add calls (torch's node index finds them); any other node of the
        # graph that plays the role is looked at only when these do not cover every call
        adds = self._adds(gm.graph.find_nodes(op="call_function", target=operator.add))
        if not all(call in adds for site in self.plan.sites for call, _ in site.calls):
            adds = self._adds(gm.graph.nodes)
        for site in self.plan.sites:
            check_contract(all(call in adds for call, _ in site.calls), f"site '{site.name}' has a call without a branch")

    def _adds(self, nodes: Iterable[Node]) -> set[str]:
        """The names of the calls whose branch of the plan's adapter ends in one of ``nodes``."""
        return {
            n.args[0].name
            for n in nodes
            if (info := provenance.node_info(n)) is not None and info["role"] == provenance.ADD
            and info["adapter"] == self.plan.adapter
        }


def rewrite(gm: GraphModule, plan: Plan) -> PassResult:
    """Run :class:`RewritePass` with ``plan`` on ``gm`` (in place)."""
    return RewritePass(plan)(gm)


def input_of(node: Node, where: int | str | tuple[int, int]) -> Node:
    """The node a site's call ``node`` takes as the branch input, read when the branch is added (an
    earlier branch may have redirected it: a module called twice reads its first call's adapted output).
    ``(i, j)`` is item j of the list argument i (``aten.einsum``'s operands)."""
    if isinstance(where, tuple):
        return node.args[where[0]][where[1]]  # type: ignore[index,return-value]
    return node.args[where] if isinstance(where, int) else node.kwargs[where]  # type: ignore[return-value]


def _add_parameters(gm: GraphModule, spec: SiteSpec) -> None:
    weight = get_parameter(gm, spec.weight)
    shape_a, shape_b = kind_of(spec).shapes(spec)
    factory = {"device": weight.device, "dtype": weight.dtype}
    A = nn.Parameter(torch.empty(shape_a, **factory))
    B = nn.Parameter(torch.empty(shape_b, **factory))
    with torch.no_grad():
        init_factors(A, B, spec)
    # Registered before any get_attr reads them.
    for qualname, value in ((spec.lora_A, A), (spec.lora_B, B)):
        owner, _, attr = qualname.rpartition(".")
        module_at(gm, owner).register_parameter(attr, value)
    if spec.dropout_module is not None:
        owner, _, attr = spec.dropout_module.rpartition(".")
        module_at(gm, owner).add_module(attr, nn.Dropout(spec.dropout))


def add_branch(gm: GraphModule, spec: SiteSpec, node: Node, where: int | str, recordings: Recordings | None = None) -> Node:
    """Insert ``spec``'s branch after the call ``node`` (which takes the branch input at ``where``) and
    return the new ``add`` node, which the former users of ``node`` now read.

    Several adapters at one site chain: ``node -> add(node, y_b) -> add(., y_a)``; each branch reads the
    call's own input, and removing one adapter's nodes splices its ``add`` out of the chain.

    With ``recordings`` (one per pass), the math of a kind that is not ``per_call`` is recorded on proxies
    once per spec less its names and replayed at the other sites of that spec (see :class:`Recordings`).
    """
    x = input_of(node, where)
    graph = gm.graph
    kind = kind_of(spec)
    anchor = node.next
    roles: dict[Node, str] = {}

    def mark(role: str) -> None:  # every node recorded since the last mark plays ``role``
        cursor = anchor.prev
        while cursor is not node and cursor not in roles:
            roles[cursor] = role
            cursor = cursor.prev

    with graph.inserting_before(anchor):  # keeps the inserted nodes in program order
        # the factors were registered just before (_add_parameters); lint checks every get_attr's target
        a = graph.create_node("get_attr", spec.lora_A)
        mark(provenance.LORA_A)
        b = graph.create_node("get_attr", spec.lora_B)
        mark(provenance.LORA_B)
        if spec.dropout_module is not None:
            x = graph.call_module(spec.dropout_module, (x,))
            mark(provenance.DROPOUT)
        recorded = None if recordings is None or kind.per_call else recordings.find(spec)
        if recorded is not None:
            y = recorded.replay(graph, x, a, b, roles)
            counters["rewrite"]["branches_replayed"] += 1
        else:
            y = _record_math(gm, spec, node, x, a, b, anchor, mark, recordings)
        out = graph.call_function(operator.add, (node, y))
        mark(provenance.ADD)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    base_meta = {k: node.meta[k] for k in _COPIED_META if k in node.meta}
    provenance.tag_base(node, spec.name, where)
    for new, role in roles.items():
        new.meta.update(base_meta)
        provenance.tag(new, spec, role)
    return out


def _record_math(
    gm: GraphModule, spec: SiteSpec, node: Node, x: Node, a: Node, b: Node, anchor: Node, mark: Callable[[str], None],
    recordings: Recordings | None,
) -> Node:
    """Record ``spec``'s shrink and expand by calling its kind's math on proxies of ``x``, ``a`` and ``b``
    (inserted before ``anchor``); kept in ``recordings`` for the other sites of the spec."""
    kind = kind_of(spec)
    tracer = _Recorder(gm.graph)
    start = anchor.prev  # the last node before the math's
    pa, pb = Proxy(a, tracer), Proxy(b, tracer)
    # experts and tied weights: the branch depends on how this call reads the weight
    call = (bind_call(gm, spec, node, pa, pb),) if kind.per_call else ()
    h = kind.shrink(Proxy(x, tracer), pa, spec, *call)
    mark(provenance.SHRINK)
    shrunk = len(tracer.made)
    y = kind.expand(h, pb, spec, *call)
    mark(provenance.EXPAND)
    if recordings is not None and not kind.per_call:
        recordings.keep(spec, tracer, shrunk, (x, a, b), y.node, (start, anchor))
    return y.node


class _Recorder(GraphAppendingTracer):
    """A tracer that keeps every ``create_node`` call it makes: what was created, with which arguments."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        super().__init__(graph)
        self.made: list[tuple[Node, tuple[Any, ...]]] = []

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None, type_expr: Any = None) -> Node:
        made = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.made.append((made, (kind, target, args, kwargs, name, type_expr)))
        return made


def _names_dropped(spec: SiteSpec) -> tuple[Any, ...]:
    """The fields of ``spec`` but its names, as a tuple (compared with ``==``: ``op`` is a dict)."""
    return tuple(getattr(spec, f) for f in _NOT_NAMES)


#: the fields of a SiteSpec that name things (the site, its tensors and modules) rather than shape its math
_NAMES = frozenset({"name", "weight", "bias", "lora_A", "lora_B", "dropout_module"})
_NOT_NAMES = tuple(f.name for f in dataclasses.fields(SiteSpec) if f.name not in _NAMES)


class _Recording:
    """The ``Graph.create_node`` calls that one site's shrink and expand made, in order, to make again for
    another site: its inputs (branch input, ``A``, ``B``) and the recorded nodes remapped to the new site's."""

    def __init__(self, calls: list[tuple[Node, tuple[Any, ...]]], shrunk: int, inputs: tuple[Node, Node, Node], out: Node) -> None:
        self.calls = [(made, call, provenance.SHRINK if i < shrunk else provenance.EXPAND, dict(made.meta))
                      for i, (made, call) in enumerate(calls)]
        self.inputs = inputs
        self.out = out

    def replay(self, graph: torch.fx.Graph, x: Node, a: Node, b: Node, roles: dict[Node, str]) -> Node:
        remap = dict(zip(self.inputs, (x, a, b)))
        get = remap.__getitem__
        for made, (kind, target, args, kwargs, name, type_expr), role, meta in self.calls:
            new = create_node_again(graph, kind, target, map_arg(args, get), map_arg(kwargs, get), name, type_expr)
            for key, value in meta.items():  # what the tracer put on the node (nothing, or preserved node meta)
                new.meta[key] = copy.copy(value)
            remap[made] = new
            roles[new] = role
        return remap[self.out]


class Recordings:
    """The branches one rewrite pass recorded on proxies, by spec less its names (:data:`_NAMES`).

    A kind that is not ``per_call`` computes its branch from the spec's shapes and hyper-parameters alone
    (:mod:`fxlora.lora`), so two sites whose specs differ only in names record the same ops on the same
    inputs: the second site makes the same ``create_node`` calls as the first, with its own inputs,
    without calling the math on proxies again.  A recording is kept only when every node the math added
    went through the tracer (checked on the graph)."""

    def __init__(self) -> None:
        self._kept: list[tuple[tuple[Any, ...], _Recording]] = []

    def find(self, spec: SiteSpec) -> _Recording | None:
        key = _names_dropped(spec)
        return next((rec for k, rec in self._kept if _equal(k, key)), None)

    def keep(
        self, spec: SiteSpec, tracer: _Recorder, shrunk: int, inputs: tuple[Node, Node, Node], out: Node, between: tuple[Node, Node]
    ) -> None:
        """Keep what ``tracer`` recorded for ``spec``: its first ``shrunk`` nodes the shrink, ``out`` the branch's
        output, all of them inserted ``between`` two nodes, reading ``inputs`` (branch input, A, B) and each other."""
        made = [m for m, _ in tracer.made]
        if not _exactly_between(made, *between):
            return  # the math inserted a node of its own: record it at every site
        known = set(inputs) | set(made)
        if out not in known:
            return
        for _, (_, _, args, kwargs, _, _) in tracer.made:
            uses: list[Node] = []
            map_arg((args, kwargs), uses.append)
            if any(n not in known for n in uses):
                return
        counters["rewrite"]["branches_recorded"] += 1
        self._kept.append((_names_dropped(spec), _Recording(tracer.made, shrunk, inputs, out)))


def _equal(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a field whose == is not a bool (a tensor in op): not provably the same
        return False


def _exactly_between(made: list[Node], start: Node, end: Node) -> bool:
    """Whether ``made`` are, in order, the nodes of the graph between ``start`` and ``end``."""
    cursor = start.next
    for node in made:
        if cursor is not node:
            return False
        cursor = cursor.next
    return bool(made) and cursor is end
