"""fxlora: LoRA for any PyTorch model, as compiler passes over its ``torch.fx`` graph.

    gm = fxlora.rewrite(model, [fxlora.Rule("*.q", r=8, alpha=16)])   # add LoRA branches, freeze the rest
    ...train gm...
    fxlora.save_lora(gm, "adapter.safetensors")                        # LoRA tensors only
    merged = fxlora.fold(gm)                                            # the base graph, merged weights
"""

from .api import capture, fold, plan, rewrite
from .errors import CheckpointError, FoldError, FxLoraError, RuleError, TraceError
from .lora import SiteSpec, graph_sites
from .module import LoraGraphModule
from .rules import Rule, load_rules, rules_from_data
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
    "rewrite",
    "fold",
    "capture",
    "plan",
    "LoraGraphModule",
    "SiteSpec",
    "graph_sites",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "load_lora_state_dict",
    "lora_parameter_names",
    "save_lora",
    "load_lora",
    "FxLoraError",
    "RuleError",
    "TraceError",
    "CheckpointError",
    "FoldError",
]

from . import export, zoo  # noqa: E402
from .peft_format import load_peft_adapter, peft_rules, save_peft_adapter  # noqa: E402
from .report import Report, report  # noqa: E402

__all__ += ["load_peft_adapter", "peft_rules", "save_peft_adapter"]
__all__ += ["export", "zoo", "report", "Report", "load_rules", "rules_from_data"]
