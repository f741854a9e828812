"""What every fxlora pass shares: torch's ``PassBase`` contract, a firing counter, and the finish.

A pass is a :class:`torch.fx.passes.infra.pass_base.PassBase`: ``pass_(gm)`` runs ``requires(gm)``,
``call(gm) -> PassResult`` and ``ensures(gm)``, so it plugs into torch's ``PassManager``.  ``call``
edits ``gm`` in place and says ``modified=True`` only when it changed the graph.  Each pass counts
what it did in :data:`counters` (``counters["fuse_siblings"]["groups"]``...), as Inductor's passes do,
so that a caller can tell how often it fired.
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict

from typing import Any

from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxlora import provenance
from fxlora.errors import PassContractError

__all__ = [
    "FxLoraPass", "RewiringPass", "PassResult", "counters", "finalize", "check_contract", "module_at", "create_node_again",
    "PassContractError",
]

#: pass name -> Counter of what it did, over the life of the process.
counters: defaultdict[str, Counter[str]] = defaultdict(Counter)


class FxLoraPass(PassBase):
    """Base of fxlora's passes: ``requires`` checks the graph is well formed before the pass, ``ensures``
    that it still is after; subclasses add their own conditions."""

    name = "fxlora_pass"

    def requires(self, graph_module: GraphModule) -> None:
        check_contract(isinstance(graph_module, GraphModule), f"{self.name} runs on a torch.fx.GraphModule")

    def ensures(self, graph_module: GraphModule) -> None:
        if not _linted_by_finalize(graph_module):
            graph_module.graph.lint()


class RewiringPass(FxLoraPass):
    """A pass that rewires the nodes of a graph the rewrite pass made and keeps its parameters: requires a
    rewritten graph, ensures the parameters (names and objects) are the ones it was given."""

    def requires(self, graph_module: GraphModule) -> None:
        super().requires(graph_module)
        check_contract(provenance.is_rewritten(graph_module), f"{self.name} runs on a graph the rewrite pass made")
        self._parameters = dict(graph_module.named_parameters())

    def ensures(self, graph_module: GraphModule) -> None:
        super().ensures(graph_module)
        now = dict(graph_module.named_parameters())
        check_contract(
            now.keys() == self._parameters.keys() and all(now[k] is v for k, v in self._parameters.items()),
            f"{self.name} changed the parameters",
        )


def check_contract(condition: bool, what: str) -> None:
    if not condition:
        raise PassContractError(what)


#: graph -> the code that :func:`finalize` generated for it right after linting it
_LINTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def finalize(gm: GraphModule) -> None:
    """Check the edited graph and regenerate ``gm``'s code (recompile last).  Passes erase the nodes they
    make obsolete themselves: no dead-code elimination here, which would also drop the *model's* unused
    nodes and make the graph differ from the captured one.

    The lint here is the one the pass's ``ensures`` would repeat right after: ``ensures`` skips its own
    when the graph still has the code generated here (recompiled by nobody since)."""
    gm.graph.lint()
    gm.recompile()
    _LINTED[gm.graph] = gm.__dict__.get("_code")


def _linted_by_finalize(gm: GraphModule) -> bool:
    """Whether :func:`finalize` linted ``gm``'s graph and nothing recompiled it since (used once)."""
    code = _LINTED.pop(gm.graph, None)
    return code is not None and code is gm.__dict__.get("_code")


def module_at(gm: GraphModule, path: str) -> nn.Module:
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


_set_args, _set_kwargs = Node.args.fset, Node.kwargs.fset  # type: ignore[attr-defined]


def create_node_again(
    graph: Graph, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None = None, type_expr: Any = None
) -> Node:
    """``graph.create_node(op, target, args, kwargs, name, type_expr)`` for the arguments of a node that was
    created before, with its nodes replaced by nodes of ``graph`` (a copy, a replayed recording).

    ``Graph.create_node`` walks the arguments of every new ``call_*`` node for raw symbolic values
    (``torch.SymInt``) to warn about; these arguments were walked when the first node was created, so the
    node is created bare and given its arguments through the ``Node.args`` / ``Node.kwargs`` setters, which
    record the uses as ``create_node`` does."""
    made = graph.create_node(op, target, None, None, name, type_expr)
    if args:
        _set_args(made, args)
    if kwargs:
        _set_kwargs(made, kwargs)
    return made
