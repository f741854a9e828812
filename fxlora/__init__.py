"""fxlora: LoRA for any PyTorch model, as compiler passes over its ``torch.fx`` graph.

    gm = fxlora.rewrite(model, [fxlora.Rule("*.q", r=8, alpha=16)])   # add LoRA branches, freeze the rest
    ...train gm...
    fxlora.save_lora(gm, "adapter.safetensors")                        # LoRA tensors only
    merged = fxlora.fold(gm)                                            # the base graph, merged weights

Modules: ``pipeline`` (capture -> plan -> rewrite), ``options`` (CaptureOptions), ``tracing``
(symbolic trace and torch.export), ``sites`` / ``resolution`` / ``ties`` (the plan), ``lora`` (the math),
``provenance`` (what fxlora records in a graph), ``folding``, ``graph_module`` (LoraGraphModule),
``state`` and ``peft_format`` (checkpoints), ``reporting``, ``export``, ``zoo``; the passes are
``fxlora.passes``.
"""

from . import export, generation, zoo
from .combine import combine_adapters
from .errors import (
    ArgumentError,
    CheckpointError,
    ExportError,
    FoldError,
    FxLoraError,
    LoraOpError,
    NotRewrittenError,
    PassContractError,
    RuleError,
    TraceError,
    UsageError,
)
from .folding import fold, load_folded
from .graph_module import LoraGraphModule
from .lora import SiteSpec
from .named_adapters import (
    active_adapters,
    adapters,
    add_adapter,
    delete_adapter,
    disable_adapter,
    set_adapter,
    unload,
)
from .options import CaptureOptions
from .peft_format import (
    load_peft_adapter,
    peft_rules,
    peft_train_modules,
    save_peft_adapter,
)
from .pipeline import capture, plan, rewrite
from .provenance import graph_sites
from .reporting import Report, report
from .resolution import Plan
from .rules import Rule, load_rules, rules_from_data
from .serving import serve
from .state import (
    load_lora,
    load_lora_state_dict,
    lora_parameter_names,
    lora_state_dict,
    mark_only_lora_as_trainable,
    save_lora,
)

__version__ = "0.1.0"

__all__ = [
    "Rule",
    "load_rules",
    "rules_from_data",
    "CaptureOptions",
    "capture",
    "plan",
    "Plan",
    "rewrite",
    "fold",
    "add_adapter",
    "adapters",
    "active_adapters",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "unload",
    "combine_adapters",
    "serve",
    "load_folded",
    "LoraGraphModule",
    "SiteSpec",
    "graph_sites",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "load_lora_state_dict",
    "lora_parameter_names",
    "save_lora",
    "load_lora",
    "peft_rules",
    "peft_train_modules",
    "load_peft_adapter",
    "save_peft_adapter",
    "report",
    "Report",
    "export",
    "generation",
    "zoo",
    # the exceptions (fxlora.errors)
    "FxLoraError", "ArgumentError", "RuleError", "TraceError", "CheckpointError", "FoldError", "ExportError",
    "NotRewrittenError", "LoraOpError", "PassContractError", "UsageError",
]
