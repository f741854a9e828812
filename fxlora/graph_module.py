"""``LoraGraphModule``: the ``GraphModule`` that :func:`fxlora.rewrite` returns.

It is an ordinary ``torch.fx.GraphModule`` (its graph holds the LoRA branches, it trains with any
optimizer and wraps in DDP/FSDP) with one addition, ``merge_on_eval``:

* off (the default): ``eval()`` keeps running the branches, exactly as in training minus dropout;
* on: in eval mode the forward runs a cached :func:`fxlora.fold` of the module (the base graph with
  merged weights: no extra latency), and ``train()`` returns to the branches.  The cache is rebuilt
  when a LoRA parameter or base weight changes (tracked by tensor version counters) and dropped on
  ``train()``.  The trainable tensors are never written: after any number of train/eval toggles
  every weight is bit-identical (loralib merges into ``weight.data`` and subtracts it back, which
  drifts).  Cost: while in eval mode, one extra copy of every *adapted* weight; gradients do not
  reach the LoRA parameters through an eval-mode forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.fx import Graph, GraphModule

from .folding import fold

__all__ = ["LoraGraphModule"]


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
        self.__dict__["_fxlora_cache"] = None

    def recompile(self):  # type: ignore[override]
        code = super().recompile()
        cls = type(self)
        graph_forward = cls.forward

        @functools.wraps(graph_forward)
        def forward(self: LoraGraphModule, *args: Any, **kwargs: Any) -> Any:
            if not self.training and self.__dict__.get("merge_on_eval", False):
                return self.merged_module()(*args, **kwargs)
            return graph_forward(self, *args, **kwargs)

        cls.forward = forward  # type: ignore[method-assign]
        return code

    def _deepcopy_init(self):  # type: ignore[override]
        merge_on_eval = self.__dict__.get("merge_on_eval", False)

        def init(res: LoraGraphModule, root: Any, graph: Graph) -> None:
            LoraGraphModule.__init__(res, root, graph, merge_on_eval=merge_on_eval)

        return init

    def train(self, mode: bool = True) -> LoraGraphModule:
        super().train(mode)
        if mode:
            self.__dict__["_fxlora_cache"] = None
        return self

    def _stamp(self) -> tuple[Any, ...]:
        """Identity and version of every parameter and buffer: any change makes the cached fold stale
        (an optimizer step, a loaded checkpoint, a bias given its own storage)."""
        return tuple((id(t), t._version, t.data_ptr()) for t in (*self.parameters(), *self.buffers()))

    def merged_module(self) -> GraphModule:
        """The folded module that eval mode runs with ``merge_on_eval`` (built or refreshed on demand)."""
        stamp = self._stamp()
        cache = self.__dict__.get("_fxlora_cache")
        if cache is None or cache[0] != stamp:
            folded = fold(self)
            folded.train(False)
            cache = (stamp, folded)
            self.__dict__["_fxlora_cache"] = cache
        return cache[1]
