"""fxlora's graph passes (installed as ``fxlora.passes``).

Each pass is a :class:`torch.fx.passes.infra.pass_base.PassBase` with ``requires`` / ``ensures``
checks, in a file of its own named for what it does, with a function of the same purpose that runs it:

* :func:`rewrite` (``RewritePass(plan)``): add LoRA branches at the sites of a plan;
* :func:`fold` (``FoldPass(dtype, weights)``): fold the branches into the weights, giving back the
  base graph;
* :func:`fuse_siblings` (``FuseSiblings()``): sibling branches that read one input share one shrink;
* :func:`make_mode_aware` (``MakeModeAware()``): ops torch.export fixed to the capture mode follow
  ``.train()`` / ``.eval()``;
* :func:`causal_attention` (``CausalAttention()``): an attention mask a ``torch.export`` capture computed
  from the lengths alone, and causal at every length, becomes ``is_causal=True`` (repeated key/value
  heads ``enable_gqa=True``);
* :func:`set_active_adapters` (``SetActiveAdapters(names)``) and :func:`remove_adapter`
  (``RemoveAdapter(name)``): which of a module's adapters the graph runs, and deleting one;
* :func:`serve_adapters` (``ServeAdapters(names)``): one graph running each sample of a batch with its
  own adapter;
* :func:`lower_linear_branches` (``LowerLinearBranches()``): each adapted linear call and its branch
  become one ``fxlora::lora_linear`` custom op (fused kernels on CUDA);
* :func:`split_units` / :func:`inline_units` (``SplitUnits(paths)``, ``InlineUnits()``): the model's
  blocks as graph modules whose forward runs (FSDP2 per block, activation checkpointing), and back.

Each edits the graph module in place and returns ``PassResult(gm, modified)`` with ``modified`` true
only when the graph changed, so the passes plug into torch's ``PassManager``.  The public API in
``fxlora`` copies what must not be shared and runs them.
"""

from .adapters_pass import (
    RemoveAdapter,
    SetActiveAdapters,
    remove_adapter,
    set_active_adapters,
)
from .attention_pass import CausalAttention, causal_attention
from .fold_pass import FoldPass, fold, fold_graph, fold_modules, merged_weights
from .fuse_siblings_pass import FuseSiblings, fuse_siblings
from .infra import FxLoraPass, PassContractError, counters
from .lower_pass import LowerLinearBranches, lower_linear_branches
from .mode_aware_pass import MakeModeAware, TrainingFlag, make_mode_aware
from .rewrite_pass import RewritePass, rewrite
from .serve_pass import ServeAdapters, read_slot, serve_adapters, write_slot
from .units_pass import InlineUnits, SplitUnits, inline_units, split_units, unit_paths

__all__ = [
    "rewrite",
    "fold",
    "fuse_siblings",
    "make_mode_aware",
    "causal_attention",
    "CausalAttention",
    "merged_weights",
    "fold_graph",
    "fold_modules",
    "lower_linear_branches",
    "split_units",
    "inline_units",
    "unit_paths",
    "SplitUnits",
    "InlineUnits",
    "LowerLinearBranches",
    "set_active_adapters",
    "remove_adapter",
    "serve_adapters",
    "read_slot",
    "write_slot",
    "RewritePass",
    "ServeAdapters",
    "SetActiveAdapters",
    "RemoveAdapter",
    "FoldPass",
    "FuseSiblings",
    "MakeModeAware",
    "TrainingFlag",
    "FxLoraPass",
    "PassContractError",
    "counters",
]
