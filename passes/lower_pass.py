"""Lower pass: each adapted linear call, with its branch, becomes one ``fxlora::lora_linear`` op.

At a linear site with one adapter's branch, the rewrite pass leaves::

    y0  = linear(x, W, b)                      # base (call_module, F.linear, aten.linear, x @ W, addmm)
    h   = linear(x, A)                         # shrink (or a dropout / fused-sibling piece of it)
    y1  = linear(h * scale, B_full)            # expand
    out = add(y0, y1)

and this pass replaces ``y0 ... out`` by ``fxlora::lora_linear(x, W, b, A, B_full, scale)`` (or
``lora_linear_h(x, W, b, h, ...)`` when ``h`` is not simply ``x A^T``): one custom op
(:mod:`fxlora.ops`) that runs eagerly, under ``torch.compile`` without a graph break and through
``torch.export``, backed by fused kernels on CUDA and by the composite math elsewhere.  Calls where
several adapters' branches chain, and sites that are not linear, are left as they are.

The lowered graph is for execution only: :class:`fxlora.LoraGraphModule` keeps the rewritten graph as
the source of truth (fold, state dicts and every other pass see the same sites) and runs a lowered
copy of it, sharing the same parameter objects, where lowering is on.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxlora import ops, provenance  # noqa: F401  (importing fxlora.ops registers the custom ops)
from fxlora.sites import SITE_OPS, op_arguments

from .infra import PassResult, RewiringPass, check_contract, counters, finalize
from .rewrite_pass import input_of

__all__ = ["LowerLinearBranches", "lower_linear_branches", "LOWERED"]

#: ``node.meta["fxlora"]["role"]`` of a lowered call.
LOWERED = "lowered"


def _base_operands(gm: GraphModule, base: Node) -> tuple[Node, Node | None, bool] | None:
    """``(weight node, bias node, transposed)`` of a base linear call, where the op reads the weight as
    ``(out, in)`` when ``transposed`` is False; None when the call cannot be lowered."""
    graph = gm.graph
    if base.op == "call_module":
        module = gm.get_submodule(base.target)
        if type(module) is not nn.Linear:
            return None  # custom leaves compute their own way
        with graph.inserting_before(base):
            weight = graph.get_attr(f"{base.target}.weight")
            bias = graph.get_attr(f"{base.target}.bias") if module.bias is not None else None
        return weight, bias, False
    site_op = SITE_OPS.get(base.target)
    if site_op is None or site_op.kind != "linear":
        return None
    args = op_arguments(base)
    weight = args.get(site_op.weight)
    bias = args.get(site_op.bias) if site_op.bias else None
    if not isinstance(weight, Node) or (bias is not None and not isinstance(bias, Node)):
        return None
    return weight, bias, site_op.computes_x_at_w


def _dropout_of(gm: GraphModule, node: Any, x: Node) -> Node | None:
    """``node`` where it is a call of an ``nn.Dropout`` submodule on ``x`` used by one node only (a site's LoRA
    dropout); None otherwise."""
    if not (isinstance(node, Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs
            and node.args[0] is x and len(node.users) == 1):
        return None
    try:
        module = gm.get_submodule(node.target)
    except AttributeError:
        return None
    return node if type(module) is torch.nn.Dropout and not module.inplace else None


def _sibling_factor(node: Any, x: Node) -> Node | None:
    """The factor ``A_i`` (its ``get_attr`` node) where ``node`` is the i-th piece of a shrink that fused siblings
    share, ``split(linear(x, cat([A_1, ..., A_k])), ranks, -1)[i]`` (:mod:`fxlora.passes.fuse_siblings_pass`),
    used by one node only; None otherwise."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem
            and len(node.users) == 1 and isinstance(node.args[1], int)):
        return None
    parts, i = node.args
    if not (isinstance(parts, Node) and parts.op == "call_method" and parts.target == "split" and len(parts.args) == 3
            and parts.args[2] == -1 and not parts.kwargs):
        return None
    fused = parts.args[0]
    if not (isinstance(fused, Node) and fused.op == "call_function" and fused.target is F.linear
            and len(fused.args) == 2 and fused.args[0] is x and not fused.kwargs):
        return None
    cat = fused.args[1]
    if not (isinstance(cat, Node) and cat.op == "call_function" and cat.target is torch.cat and len(cat.args) == 2
            and cat.args[1] == 0 and isinstance(cat.args[0], (list, tuple)) and i < len(cat.args[0])):
        return None
    factor = cat.args[0][i]
    ranks = parts.args[1]
    if not (isinstance(factor, Node) and factor.op == "get_attr" and isinstance(ranks, (list, tuple))
            and len(ranks) == len(cat.args[0])):
        return None
    return factor


def _lower_call(gm: GraphModule, add: Node, modules: bool = True, h_inputs: bool = True,
                dropout_inputs: bool = False, sibling_inputs: bool = False) -> bool:
    base, y1 = add.args
    if not modules and isinstance(base, Node) and base.op == "call_module":
        return False  # the module's own call (its hooks, its current class and bias) stays
    base_info = provenance.node_info(base) if isinstance(base, Node) else None
    if base_info is None or base_info["role"] != provenance.BASE:
        return False  # several adapters chain at this call
    if not (isinstance(y1, Node) and y1.op == "call_function" and y1.target is F.linear and len(y1.args) == 2):
        return False
    h, b_full = y1.args
    scaled, scale = _scaled_by_number(h)
    if scaled is not None:
        h = scaled.args[0]
    operands = _base_operands(gm, base)
    if operands is None:
        return False
    weight, bias, transposed = operands
    x = input_of(base, base_info["input"])
    # the branch's own shrink F.linear(input, A), used by the expand only
    shrink = isinstance(h, Node) and h.op == "call_function" and h.target is F.linear and len(h.args) == 2 and len(h.users) == 1
    shrink_reads_x = shrink and h.args[0] is x
    dropped = _dropout_of(gm, h.args[0], x) if dropout_inputs and shrink and not shrink_reads_x else None
    sibling = _sibling_factor(h, x) if sibling_inputs and not shrink else None
    if not shrink_reads_x and dropped is None and sibling is None and not h_inputs:
        return False
    graph = gm.graph
    with graph.inserting_before(add):
        if transposed:
            weight = graph.call_function(torch.t, (weight,))
        if dropped is not None:
            from fxlora.ops import lora_linear_dropout_eager

            module = graph.get_attr(dropped.target)  # the nn.Dropout itself: whether it is the identity now
            lowered = graph.call_function(lora_linear_dropout_eager, (x, weight, bias, dropped, module, h.args[1], b_full,
                                                                      scale))
        elif shrink_reads_x or sibling is not None:
            factor = h.args[1] if sibling is None else sibling
            lowered = graph.call_function(torch.ops.fxlora.lora_linear.default, (x, weight, bias, factor, b_full, scale))
        else:
            lowered = graph.call_function(torch.ops.fxlora.lora_linear_h.default, (x, weight, bias, h, b_full, scale))
    lowered.meta.update({k: add.meta[k] for k in ("nn_module_stack", "stack_trace") if k in add.meta})
    lowered.meta[provenance.META_KEY] = {**provenance.node_info(add), "role": LOWERED}
    add.replace_all_uses_with(lowered)
    own_shrink = shrink_reads_x or dropped is not None or sibling is not None
    parts = h.args[0] if sibling is not None else None
    for node in (add, y1, scaled, h if own_shrink else None, base):
        if node is not None and not node.users:
            graph.erase_node(node)
    if sibling is not None:  # the shared shrink goes with its last piece
        chain = (parts, parts.args[0], parts.args[0].args[1])  # (erasing a node clears its arguments)
        for node in chain:
            if node.users:
                break
            graph.erase_node(node)
    return True


def _scaled_by_number(node: Any) -> tuple[Node | None, float]:
    """``(node, s)`` where ``node`` is ``t * s`` (a number ``s``) used by one node only, the expand, which the
    op replaces with ``s`` as its scale; ``(None, 1.0)`` otherwise (a graph rewritten before the expand
    scaled ``h`` has ``linear(h, B * s)``: it is lowered with scale 1)."""
    if (
        isinstance(node, Node) and node.op == "call_function" and node.target in (operator.mul, torch.mul)
        and len(node.args) == 2 and not node.kwargs and isinstance(node.args[0], Node)
        and type(node.args[1]) in (int, float) and len(node.users) == 1
    ):
        return node, float(node.args[1])
    return None, 1.0


class LowerLinearBranches(RewiringPass):
    """Lower each single-adapter linear call with its branch to one ``fxlora::lora_linear`` op (see the
    module docstring).

    Requires a rewritten graph; ensures the parameters are those it was given (the op reads the same
    objects) and every node it made is a lowered call of a site."""

    name = "lower_linear_branches"

    def __init__(self, *, modules: bool = True, h_inputs: bool = True, dropout_inputs: bool = False,
                 sibling_inputs: bool = False) -> None:
        super().__init__()
        #: also lower a base that is a module call (an ``nn.Linear``), reading its weight and bias directly
        self.modules = modules
        #: also lower a site whose branch input is not ``x A^T`` (LoRA dropout, a shrink shared by fused
        #: siblings) to ``fxlora::lora_linear_h``, which runs its base GEMM where the add was
        self.h_inputs = h_inputs
        #: lower a site whose branch input is its LoRA dropout (an ``nn.Dropout`` submodule) of ``x`` to a call
        #: of :func:`fxlora.ops.lora_linear_dropout_eager`, which merges where the dropout is the identity:
        #: for the eager lowering of forwards that record no gradient only (it is a plain function, not an op)
        self.dropout_inputs = dropout_inputs
        #: lower a site whose branch input is its piece of a shrink shared by fused siblings to
        #: ``fxlora::lora_linear`` over its own factor, so that it merges like any other site (the shared shrink
        #: goes once every piece is lowered): for forwards that record no gradient, where a train step keeps
        #: the shared shrink
        self.sibling_inputs = sibling_inputs

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.ops.fxlora.lora_linear.default,
                                                              torch.ops.fxlora.lora_linear_h.default):
                info = provenance.node_info(node)
                check_contract(info is not None and info["role"] == LOWERED, f"{node.name} is not a lowered site call")

    def call(self, gm: GraphModule) -> PassResult:
        adds = [
            n for n in gm.graph.nodes
            if (info := provenance.node_info(n)) is not None and info["role"] == provenance.ADD and info["spec"].kind == "linear"
        ]
        lowered = sum(_lower_call(gm, add, self.modules, self.h_inputs, self.dropout_inputs, self.sibling_inputs)
                      for add in adds)
        if not lowered:
            return PassResult(gm, False)
        counters[self.name]["calls"] += lowered
        finalize(gm)
        return PassResult(gm, True)


def lower_linear_branches(gm: GraphModule, *, modules: bool = True, h_inputs: bool = True,
                          dropout_inputs: bool = False, sibling_inputs: bool = False) -> PassResult:
    """Run :class:`LowerLinearBranches` on ``gm`` (in place); ``modules=False`` leaves the sites whose base
    is a module call as they are, ``h_inputs=False`` those whose branch input is not ``x A^T`` (except, with
    ``dropout_inputs``, a LoRA dropout's sites, and with ``sibling_inputs`` fused siblings' sites: see
    :class:`LowerLinearBranches`)."""
    return LowerLinearBranches(modules=modules, h_inputs=h_inputs, dropout_inputs=dropout_inputs,
                               sibling_inputs=sibling_inputs)(gm)
