"""Read and write Hugging Face PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

* :func:`peft_rules` turns a PEFT adapter folder into fxlora rules, one exact-name rule per adapted
  module, with PEFT's own rank/alpha resolution (``rank_pattern``, ``alpha_pattern``, rsLoRA);
* :func:`load_peft_adapter` loads the folder into a module rewritten with those rules (all or
  nothing: keys, ranks, scales and shapes are checked first);
* :func:`save_peft_adapter` writes a folder that ``peft.PeftModel.from_pretrained`` loads.

The tensor layouts agree: PEFT's ``lora_A.weight`` is fxlora's ``lora_A`` (``(r, in)``, or the conv
kernel), ``lora_B.weight`` is ``lora_B``, and ``lora_embedding_A`` / ``lora_embedding_B`` are the
Embedding factors.  PEFT has no per-slice mask (``enable_lora``), no grouped-conv factorisation like
fxlora's and no adapters on raw parameters: such sites are refused with a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from .errors import CheckpointError
from .lora import SiteSpec
from .provenance import require_sites
from .rules import Rule
from .state import load_lora_state_dict

__all__ = ["peft_rules", "load_peft_adapter", "save_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_qalora")
_UNSUPPORTED_SET = ("modules_to_save", "target_parameters", "trainable_token_indices", "layer_replication")
_KEY = re.compile(r"^(?P<site>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def _read(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"'{folder}' is not a PEFT adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(as written by PeftModel.save_pretrained)."
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read '{config_path}': {e}.") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"'{config_path}' is a {kind!r} adapter; fxlora reads LORA adapters only.")
    for key in _UNSUPPORTED_TRUE:
        if config.get(key):
            raise CheckpointError(f"'{config_path}' uses {key}=true, which fxlora does not implement.")
    for key in _UNSUPPORTED_SET:
        if config.get(key):
            raise CheckpointError(f"'{config_path}' sets {key}, which fxlora does not implement.")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"'{weights_path}' is not a readable safetensors file ({e}).") from None
    return config, tensors


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern resolution: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _sites_in_file(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    sites: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _KEY.match(name)
        if m is None:
            others[name] = value
            continue
        sites.setdefault(m["site"], {})[m["part"]] = value
    return sites, others


def _r_alpha(config: dict[str, Any], name: str) -> tuple[int, float]:
    r = int(_pattern_value(config.get("rank_pattern", {}), name, config.get("r", 8)))
    alpha = float(_pattern_value(config.get("alpha_pattern", {}), name, config.get("lora_alpha", 8)))
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # scale alpha / sqrt(r) expressed as fxlora's alpha / r
    return r, alpha


def peft_rules(folder: str | os.PathLike[str]) -> list[Rule]:
    """fxlora rules that reproduce a PEFT LoRA adapter: one exact-name rule per adapted module."""
    config, tensors = _read(folder)
    sites, _ = _sites_in_file(tensors)
    if not sites:
        raise CheckpointError(f"'{folder}' holds no LoRA tensors.")
    rules = []
    for name in sites:
        r, alpha = _r_alpha(config, name)
        rules.append(Rule(name, r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0) or 0.0)))
    return rules


def _check_module_site(spec: SiteSpec, what: str) -> None:
    if spec.lora_A != f"{spec.name}.lora_A":
        raise CheckpointError(
            f"{what}: site '{spec.name}' adapts a raw parameter ({spec.weight}); PEFT adapters hold modules only."
        )
    if spec.enable_lora is not None:
        raise CheckpointError(
            f"{what}: site '{spec.name}' uses enable_lora={list(spec.enable_lora)}; PEFT has no per-slice mask "
            "(it adapts the whole fused projection). Rewrite without enable_lora to exchange adapters with PEFT."
        )
    if spec.kind == "conv" and spec.op.get("groups", 1) != 1:
        raise CheckpointError(f"{what}: site '{spec.name}' is a grouped convolution; PEFT factorises those differently.")


def load_peft_adapter(gm: GraphModule, folder: str | os.PathLike[str]) -> Any:
    """Load a PEFT LoRA adapter folder into ``gm`` (rewritten with :func:`peft_rules` or equivalent rules).

    Every adapted module of the file must be a site of ``gm`` with the same rank and scale, and the
    other way round; on any mismatch a :class:`CheckpointError` says what differs and nothing is loaded.
    """
    sites = require_sites(gm, "load_peft_adapter")
    config, tensors = _read(folder)
    file_sites, others = _sites_in_file(tensors)
    missing = [n for n in sites if n not in file_sites]
    unexpected = [n for n in file_sites if n not in sites]
    if missing or unexpected:
        parts = []
        if unexpected:
            parts.append(f"the adapter adapts {', '.join(unexpected[:5])}, which the model does not")
        if missing:
            parts.append(f"the model adapts {', '.join(missing[:5])}, which the adapter does not")
        raise CheckpointError(
            f"'{folder}' does not fit this model: {'; '.join(parts)}. Rewrite with fxlora.peft_rules(folder). "
            "Nothing was loaded."
        )
    state: dict[str, torch.Tensor] = {}
    for name, spec in sites.items():
        _check_module_site(spec, "load_peft_adapter")
        r, alpha = _r_alpha(config, name)
        if r != spec.r or not math.isclose(alpha / r, spec.scale, rel_tol=1e-6):
            raise CheckpointError(
                f"'{folder}' gives '{name}' r={r} and scale={alpha / r:g}, the model has r={spec.r} and "
                f"scale={spec.scale:g}. Rewrite with fxlora.peft_rules(folder). Nothing was loaded."
            )
        parts = file_sites[name]
        if spec.kind == "embedding":
            a, b = parts.get("lora_embedding_A"), parts.get("lora_embedding_B")
        else:
            a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if a is None or b is None:
            raise CheckpointError(f"'{folder}' lacks the A or B tensor of {spec.kind} site '{name}'. Nothing was loaded.")
        state[spec.lora_A], state[spec.lora_B] = a, b
    for name, value in others.items():  # biases trained with bias="all" / "lora_only"
        state[name] = value
    return load_lora_state_dict(gm, state)


def save_peft_adapter(
    gm: GraphModule, folder: str | os.PathLike[str], *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``gm``'s LoRA tensors as a PEFT adapter folder (replacing the two files if present)."""
    from safetensors.torch import save_file

    sites = require_sites(gm, "save_peft_adapter")
    for spec in sites.values():
        _check_module_site(spec, "save_peft_adapter")
    specs = list(sites.values())
    r0, a0 = specs[0].r, specs[0].alpha
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": specs[0].dropout,
        "target_modules": [s.name for s in specs],
        "rank_pattern": {re.escape(s.name): s.r for s in specs if s.r != r0},
        "alpha_pattern": {re.escape(s.name): s.alpha for s in specs if s.alpha != a0},
        "fan_in_fan_out": any(s.fan_in_fan_out for s in specs),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {}
    for spec in specs:
        a = gm.get_parameter(spec.lora_A).detach().cpu().contiguous().clone()
        b = gm.get_parameter(spec.lora_B).detach().cpu().contiguous().clone()
        if spec.kind == "embedding":
            tensors[f"{PREFIX}{spec.name}.lora_embedding_A"], tensors[f"{PREFIX}{spec.name}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PREFIX}{spec.name}.lora_A.weight"], tensors[f"{PREFIX}{spec.name}.lora_B.weight"] = a, b
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fxlora-peft-", dir=folder))
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
