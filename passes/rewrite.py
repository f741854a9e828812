"""Rewrite pass: add a LoRA side branch at every site of a plan.

For each planned site it registers ``lora_A`` / ``lora_B`` (and an ``nn.Dropout`` when the rule has
dropout) on the module that owns the site, then after every call node of the site inserts::

    a   = get_attr <site>.lora_A
    b   = get_attr <site>.lora_B
    xd  = call_module <site>.lora_dropout (x)        # only with dropout > 0
    ... the kind's branch(xd, a, b), recorded from fxlora.lora ...
    out = add(base_out, branch)

and redirects the users of ``base_out`` to ``out``.  A module called several times gets one pair of
parameters read by every call's branch.  Every created node gets the base node's ``nn_module_stack``
and ``stack_trace`` and ``meta["fxlora"] = {"site", "role", "spec"}``.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node, Proxy
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.proxy import GraphAppendingTracer

from fxlora.lora import META_KEY, kind_of
from fxlora.plan import Plan, PlannedSite, input_of

from ._graph import finalize

_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def rewrite(gm: GraphModule, plan: Plan) -> PassResult:
    """Apply ``plan`` (from :func:`fxlora.plan.make_plan`) to ``gm`` in place."""
    for site in plan.sites:
        _add_parameters(gm, site)
        for node, where in zip(site.candidate.nodes, site.candidate.inputs):
            _add_branch(gm, site, node, input_of(node, where))
    if plan.sites:
        finalize(gm)
    return PassResult(gm, bool(plan.sites))


def _add_parameters(gm: GraphModule, site: PlannedSite) -> None:
    spec = site.spec
    weight = gm.get_parameter(spec.weight)
    shape_a, shape_b = kind_of(spec).shapes(spec)
    factory = {"device": weight.device, "dtype": weight.dtype}
    A = nn.Parameter(torch.empty(shape_a, **factory))
    B = nn.Parameter(torch.empty(shape_b, **factory))
    with torch.no_grad():
        kind_of(spec).init_(A, B)
    # Registered before any get_attr reads them.
    for qualname, value in ((spec.lora_A, A), (spec.lora_B, B)):
        owner, _, attr = qualname.rpartition(".")
        _module_at(gm, owner).register_parameter(attr, value)
    if spec.dropout_module is not None:
        owner, _, attr = spec.dropout_module.rpartition(".")
        _module_at(gm, owner).add_module(attr, nn.Dropout(spec.dropout))


def _module_at(gm: GraphModule, path: str) -> nn.Module:
    """The submodule at ``path``, creating empty containers on the way (a captured graph module holds
    only the modules and attributes its graph reads)."""
    mod: nn.Module = gm
    for part in path.split(".") if path else []:
        child = mod._modules.get(part)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    return mod


def _add_branch(gm: GraphModule, site: PlannedSite, node: Node, x: Node) -> None:
    spec = site.spec
    graph = gm.graph
    tracer = GraphAppendingTracer(graph)
    anchor = node.next
    with graph.inserting_before(anchor):  # keeps the inserted nodes in program order
        a = graph.get_attr(spec.lora_A)
        b = graph.get_attr(spec.lora_B)
        xd = graph.call_module(spec.dropout_module, (x,)) if spec.dropout_module else x
        branch = kind_of(spec).branch(Proxy(xd, tracer), Proxy(a, tracer), Proxy(b, tracer), spec).node
        out = graph.call_function(operator.add, (node, branch))
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)

    base_meta = {k: node.meta[k] for k in _COPIED_META if k in node.meta}
    node.meta[META_KEY] = {"site": spec.name, "role": "base", "spec": spec}
    roles = {a: "lora_A", b: "lora_B", out: "add"}
    if xd is not x:
        roles[xd] = "dropout"
    new = node.next
    while new is not anchor:
        new.meta.update(base_meta)
        new.meta[META_KEY] = {"site": spec.name, "role": roles.get(new, "branch"), "spec": spec}
        new = new.next
