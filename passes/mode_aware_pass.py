"""Mode-aware pass: make ops that torch.export fixed to the capture mode follow ``.train()``/``.eval()``.

``torch.export`` records ``aten.dropout(x, p, train=True)``, ``scaled_dot_product_attention(...,
dropout_p=0.1)`` and ``batch_norm(..., training=True, ...)`` with the mode of the capture baked in as a
constant.  This pass replaces each such constant by the output of a tiny ``TrainingFlag`` submodule
that returns the module's live ``training`` flag (``dropout_p`` becomes ``p * flag``), so the captured
graph module honours ``.train()`` / ``.eval()`` like any module.  Ops captured in eval mode (constant
False or 0) stay as they are.  Arguments are found by name in each op's schema.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from .infra import FxLoraPass, PassResult, check_contract, counters, finalize

__all__ = ["TrainingFlag", "MakeModeAware", "make_mode_aware"]

FLAG_MODULE = "_fxlora_training"


class TrainingFlag(nn.Module):
    """Returns its own ``training`` flag (the graph module's, since ``.train()`` recurses)."""

    def forward(self) -> bool:
        return self.training


def _mode_dependent() -> dict[Any, tuple[str, str]]:
    """op -> (argument name, how): ``"bool"`` passes the flag, ``"scale"`` multiplies the captured value
    by it."""
    aten = torch.ops.aten
    return {
        aten.dropout.default: ("train", "bool"),
        aten.feature_dropout.default: ("train", "bool"),
        aten.alpha_dropout.default: ("train", "bool"),
        aten.feature_alpha_dropout.default: ("train", "bool"),
        aten.scaled_dot_product_attention.default: ("dropout_p", "scale"),
        aten.batch_norm.default: ("training", "bool"),
        aten._native_batch_norm_legit_functional.default: ("training", "bool"),
    }


def _fixed_args(gm: GraphModule) -> list[tuple[Node, int, str, str, Any]]:
    """(node, position, name, how, captured value) of every mode-dependent argument that is a constant
    captured in training mode."""
    table = _mode_dependent()
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in table:
            continue
        name, how = table[node.target]
        position = [a.name for a in node.target._schema.arguments].index(name)
        value = node.args[position] if position < len(node.args) else node.kwargs.get(name)
        if isinstance(value, Node) or not value:
            continue  # already live, or captured in eval mode: nothing to make live
        found.append((node, position, name, how, value))
    return found


class MakeModeAware(FxLoraPass):
    name = "make_mode_aware"

    def call(self, gm: GraphModule) -> PassResult:
        fixed = _fixed_args(gm)
        if not fixed:
            return PassResult(gm, False)
        graph = gm.graph
        if FLAG_MODULE not in gm._modules:
            gm.add_submodule(FLAG_MODULE, TrainingFlag())
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            flag = graph.call_module(FLAG_MODULE, ())
        for node, position, name, how, value in fixed:
            new_value: Any = flag
            if how == "scale":
                with graph.inserting_before(node):
                    new_value = graph.call_function(operator.mul, (float(value), flag))
            if position < len(node.args):
                node.args = (*node.args[:position], new_value, *node.args[position + 1 :])
            else:
                node.kwargs = {**node.kwargs, name: new_value}
        counters[self.name]["ops"] += len(fixed)
        finalize(gm)
        return PassResult(gm, True)

    def ensures(self, gm: GraphModule) -> None:
        super().ensures(gm)
        check_contract(not _fixed_args(gm), "make_mode_aware left a mode-dependent op with a constant training argument")


def make_mode_aware(gm: GraphModule) -> PassResult:
    """Run :class:`MakeModeAware` on ``gm`` (in place)."""
    return MakeModeAware()(gm)
