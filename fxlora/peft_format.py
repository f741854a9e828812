"""Read and write Hugging Face PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

* :func:`peft_rules` turns a PEFT adapter folder into fxlora rules, one exact-name rule per adapted
  module, with the rank read from the tensors and alpha from the config (PEFT's ``rank_pattern`` /
  ``alpha_pattern`` resolution, rsLoRA);
* :func:`load_peft_adapter` loads the folder into a module rewritten with those rules (all or
  nothing: keys, ranks, scales, shapes and values are checked first);
* :func:`save_peft_adapter` writes a folder that ``peft.PeftModel.from_pretrained`` loads.

The folder is treated as one unit: a save switches the config and the weights together (the new
version is built beside the folder and exchanged with it, see :mod:`fxlora.files`), and a load reads
both files from one version of the folder.  The config is untrusted input: every field fxlora uses is
validated (types, ranges, nesting), its patterns are matched in linear time (:mod:`fxlora.patterns`),
and a config that contradicts the tensors (another rank, a module ``target_modules`` does not select)
is refused with a :class:`CheckpointError` naming the field.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.fx import GraphModule

from . import files
from .distributed import is_writer
from .errors import ArgumentError, CheckpointError
from .lora import SiteSpec
from .patterns import Pattern, PatternBudget, compile_pattern
from .provenance import adapter_state
from .resolution import canonical_name
from .rules import FLOAT32_MAX, FLOAT32_TINY, Rule
from .state import adapter_sites as resolve_adapter
from .state import load_into, lora_state_dict, tensors_for_file

__all__ = [
    "peft_rules",
    "peft_train_modules",
    "load_peft_adapter",
    "save_peft_adapter",
    "PeftSite",
    "read_adapter",
    "validate_config",
    "adapter_sites",
    "adapter_files",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT: a torch.save pickle, read with weights_only=True
PREFIX = "base_model.model."
MAX_RANK = 1 << 20
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # real configs are a few kilobytes
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_qalora")
_UNSUPPORTED_SET = (
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
)
# Initialisations that change the base weights: the adapter is only right on top of those new weights.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_KEY = re.compile(r"^(?P<site>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


# --------------------------------------------------------------------------------------------- #
# the config: every field fxlora reads, validated
# --------------------------------------------------------------------------------------------- #


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rank(v: Any) -> str | None:
    return None if _is_int(v) and 0 < v <= MAX_RANK else f"a positive int (at most {MAX_RANK})"


def _alpha(v: Any) -> str | None:
    return None if _is_number(v) and v > 0 else "a positive finite number"


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def inner(v: Any) -> str | None:
        if v is None:
            return None
        problem = check(v)
        return None if problem is None else f"null or {problem}"

    return inner


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _string(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def _dropout(v: Any) -> str | None:
    return None if _is_number(v) and 0 <= v < 1 else "a number in [0, 1)"


def _names(v: Any) -> str | None:
    if isinstance(v, str):
        return None
    if isinstance(v, list) and all(isinstance(x, str) and x for x in v):
        return None
    return "a string (a regular expression) or a list of non-empty module names"


def _layers(v: Any) -> str | None:
    if _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)):
        return None
    return "an int or a list of ints"


def _layers_pattern(v: Any) -> str | None:
    return None if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)) else "a string or a list of strings"


def _init(v: Any) -> str | None:
    return None if isinstance(v, (bool, str)) else "true, false or the name of an initialisation"


def _bias(v: Any) -> str | None:
    return None if v in ("none", "all", "lora_only") else "'none', 'all' or 'lora_only'"


def _anything(v: Any) -> str | None:
    return None


_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "peft_type": _string,
    "r": _rank,
    "lora_alpha": _alpha,
    "lora_dropout": _optional(_dropout),
    "rank_pattern": _anything,  # checked entry by entry below
    "alpha_pattern": _anything,
    "target_modules": _optional(_names),
    "exclude_modules": _optional(_names),
    "modules_to_save": _optional(_names),
    "use_rslora": _optional(_bool),
    "fan_in_fan_out": _optional(_bool),
    "inference_mode": _optional(_bool),
    "use_dora": _optional(_bool),
    "lora_bias": _optional(_bool),
    "use_qalora": _optional(_bool),
    "bias": _optional(_bias),
    "init_lora_weights": _optional(_init),
    "layers_to_transform": _optional(_layers),
    "layers_pattern": _optional(_layers_pattern),
    "base_model_name_or_path": _optional(_string),
    "task_type": _optional(_string),
    "revision": _optional(_string),
}


@dataclass(frozen=True)
class _Config:
    """The validated fields of an adapter config that decide values."""

    r: int
    alpha: float
    dropout: float
    rslora: bool
    rank_pattern: tuple[tuple[str, Pattern, int], ...]
    alpha_pattern: tuple[tuple[str, Pattern, float], ...]
    target_modules: str | Pattern | tuple[str, ...] | None
    exclude_modules: Pattern | tuple[str, ...] | None
    raw: dict[str, Any]


def _patterns(
    config: dict[str, Any], field: str, value_check: Callable[[Any], str | None], source: str, budget: PatternBudget
) -> tuple:
    table = config.get(field)
    if table is None:
        return ()
    if not isinstance(table, dict):
        raise CheckpointError(f"{source}: field '{field}' must be an object mapping patterns to values, got {type(table).__name__}.")
    out = []
    for key, value in table.items():
        problem = value_check(value)
        if problem is not None:
            raise CheckpointError(f"{source}: field '{field}' entry {key!r} must be {problem}, got {_show(value)}.")
        where = f"{source}: field '{field}' key {_show(key)}"
        compile_pattern(key, field=where, error=CheckpointError, budget=budget)
        # PEFT's resolution: the first key that matches the end of the module name, after a dot
        pattern = compile_pattern(rf"(.*\.)?({key})$", field=where, error=CheckpointError, budget=budget)
        out.append((key, pattern, value))
    return tuple(out)


def _name_matcher(
    config: dict[str, Any], field: str, source: str, budget: PatternBudget
) -> Pattern | tuple[str, ...] | None:
    value = config.get(field)
    if value is None or (field == "target_modules" and value == "all-linear"):
        return None  # every module (PEFT's "all-linear" selects every linear layer but the output head)
    if isinstance(value, str):
        return compile_pattern(value, field=f"{source}: field '{field}'", error=CheckpointError, budget=budget)
    budget.used_patterns += len(value)  # names, matched in linear time, but each one is work per module
    if budget.used_patterns > budget.patterns:
        raise CheckpointError(
            f"{source}: field '{field}' has {len(value)} entries, and the config more than {budget.patterns} names and "
            "patterns in all; fxlora bounds the work a file may ask for. Nothing was loaded."
        )
    return tuple(value)


def validate_config(config: Any, source: str) -> _Config:
    """Check every field of a PEFT LoRA config that fxlora reads (others are ignored; the nesting of the
    whole document was bounded when it was parsed).  Raises :class:`CheckpointError` naming the field."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source} must hold a JSON object, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{source}: field 'peft_type' is {config.get('peft_type')!r}; fxlora reads LORA adapters only."
        )
    for field, check in _FIELDS.items():
        if field in config:
            problem = check(config[field])
            if problem is not None:
                raise CheckpointError(f"{source}: field '{field}' must be {problem}, got {_show(config[field])}.")
    for field in _UNSUPPORTED_TRUE:
        if config.get(field):
            raise CheckpointError(f"{source}: field '{field}' is true, which fxlora does not implement.")
    for field in _UNSUPPORTED_SET:
        if config.get(field):
            raise CheckpointError(f"{source}: field '{field}' is set, which fxlora does not implement.")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{source}: field 'init_lora_weights' is {init!r}: that initialisation changes the base model's weights, "
            "so this adapter is only right on top of them. Convert it to a plain LoRA adapter first (PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )
    budget = PatternBudget(source)  # one bound on the work of all the config's patterns together
    return _Config(
        r=config.get("r", 8),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora") or False),
        rank_pattern=_patterns(config, "rank_pattern", _rank, source, budget),
        alpha_pattern=_patterns(config, "alpha_pattern", _alpha, source, budget),
        target_modules=_name_matcher(config, "target_modules", source, budget),
        exclude_modules=_name_matcher(config, "exclude_modules", source, budget),
        raw=config,
    )


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _selects(matcher: Pattern | tuple[str, ...], name: str) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` test: a string is a regular expression that must
    match the whole name; a list holds names that must equal the name or end it after a dot."""
    if isinstance(matcher, Pattern):
        return matcher.fullmatch(name)
    return name in matcher or any(name.endswith(f".{t}") for t in matcher)


# --------------------------------------------------------------------------------------------- #
# the folder: one version of config and tensors
# --------------------------------------------------------------------------------------------- #


def read_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, tensors)`` of a PEFT adapter folder, both from one version of it (the folder is opened
    once and both files are read relative to it).  The config is parsed (bounded nesting, no NaN, no
    duplicate keys) but not yet validated (:func:`validate_config`)."""
    root = files.as_path(folder, "PEFT adapter")
    found = files.read_folder(root, (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME), what="PEFT adapter")
    weights_name = WEIGHTS_NAME if found[WEIGHTS_NAME] is not None else LEGACY_WEIGHTS_NAME
    config_data, weights_data = found[CONFIG_NAME], found[weights_name]
    if config_data is None or weights_data is None:
        raise CheckpointError(
            f"'{root}' is not a PEFT adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(as written by PeftModel.save_pretrained)."
        )
    if len(config_data) > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"'{root / CONFIG_NAME}' is {len(config_data):,} bytes; an adapter config is a few kilobytes (at most "
            f"{MAX_CONFIG_BYTES:,})."
        )
    config = files.parse_json(config_data, source=f"'{root / CONFIG_NAME}'")
    tensors, _ = files.parse_tensor_file(weights_data, source=f"'{root / weights_name}'")
    return config, tensors


@dataclass(frozen=True)
class PeftSite:
    """One adapted module of a PEFT adapter: its rank read from the tensors, its alpha from the config
    (rsLoRA's ``alpha / sqrt(r)`` expressed as fxlora's ``alpha / r``)."""

    name: str
    embedding: bool
    r: int
    alpha: float
    lora_A: torch.Tensor
    lora_B: torch.Tensor

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def _tensor_rank(name: str, a: Any, b: Any, source: str) -> int:
    for part, t in (("A", a), ("B", b)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            what = type(t).__name__ if not isinstance(t, torch.Tensor) else f"{t.dim()}-D tensor"
            raise CheckpointError(f"{source}: the LoRA {part} factor of '{name}' is a {what}; it must be a matrix (or conv kernel).")
    r = int(a.shape[0])
    if r < 1 or int(b.shape[1]) != r:
        raise CheckpointError(
            f"{source}: the factors of '{name}' disagree: lora_A has {r} rows, lora_B has {int(b.shape[1])} columns "
            "(both are the rank)."
        )
    return r


def adapter_sites(config: _Config, tensors: dict[str, Any], source: str) -> tuple[dict[str, PeftSite], dict[str, Any]]:
    """The adapted modules of an adapter, by name, and the tensors that are not LoRA factors (biases).

    The rank of each module is the tensors' rank; the config must agree with it (``r`` or the
    ``rank_pattern`` entry that selects the module) and ``target_modules`` / ``exclude_modules`` must
    select it, else :class:`CheckpointError` names the field.  So a config can never make fxlora
    allocate more than the tensors in the file justify."""
    parts: dict[str, dict[str, Any]] = {}
    others: dict[str, Any] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _KEY.match(name)
        if m is None:
            others[name] = value
            continue
        parts.setdefault(m["site"], {})[m["part"]] = value
    sites: dict[str, PeftSite] = {}
    for name, found in parts.items():
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_key not in found or b_key not in found or len(found) != 2:
            raise CheckpointError(
                f"{source}: module '{name}' has the tensors {sorted(found)}; a LoRA module needs exactly {a_key} and "
                f"{b_key}. Nothing was loaded."
            )
        a, b = found[a_key], found[b_key]
        r = _tensor_rank(name, a, b, source)
        r_field, r_config = "r", config.r
        for key, pattern, value in config.rank_pattern:
            if pattern.match(name):
                r_field, r_config = f"rank_pattern[{key!r}]", value
                break
        if r_config != r:
            raise CheckpointError(
                f"{source}: field '{r_field}' gives module '{name}' rank {r_config}, but its tensors have rank {r}. "
                "The config contradicts the weights; fix the config. Nothing was loaded."
            )
        alpha, a_field = config.alpha, "lora_alpha"
        for key, pattern, value in config.alpha_pattern:
            if pattern.match(name):
                alpha, a_field = float(value), f"alpha_pattern[{key!r}]"
                break
        alpha = _checked_alpha(alpha, r, config.rslora, a_field, name, source)
        if config.target_modules is not None and not _selects(config.target_modules, name):
            raise CheckpointError(
                f"{source}: field 'target_modules' ({_show(config.raw.get('target_modules'))}) does not select "
                f"module '{name}', which the tensors adapt. The config contradicts the weights. Nothing was loaded."
            )
        if config.exclude_modules is not None and _selects(config.exclude_modules, name):
            raise CheckpointError(
                f"{source}: field 'exclude_modules' excludes module '{name}', which the tensors adapt. The config "
                "contradicts the weights. Nothing was loaded."
            )
        sites[name] = PeftSite(name, embedding, r, alpha, a, b)
    return sites, others


def _checked_alpha(alpha: float, r: int, rslora: bool, field: str, name: str, source: str) -> float:
    """fxlora's alpha for a module of rank ``r`` (rsLoRA's scale ``alpha / sqrt(r)`` expressed as fxlora's
    ``alpha / r``), refusing a config whose alpha or scale is not a finite positive float32, naming the
    config fields it came from."""
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    fxlora_alpha = alpha * math.sqrt(r) if rslora else alpha
    ok = all(math.isfinite(v) and FLOAT32_TINY <= v <= FLOAT32_MAX for v in (scale, fxlora_alpha))
    if not ok:
        formula = f"{field} / sqrt(r)" if rslora else f"{field} / r"
        raise CheckpointError(
            f"{source}: field '{field}' ({alpha!r})" + (" with field 'use_rslora' true" if rslora else "")
            + f" gives module '{name}' (rank {r}) the scale {formula} = {scale!r}"
            + (f" and fxlora's alpha {field} * sqrt(r) = {fxlora_alpha!r}" if rslora else "")
            + "; both must be normal float32 numbers (not rounded to zero, not overflowing). Fix the config's "
            + ("'use_rslora' or " if rslora else "") + f"'{field}'. Nothing was loaded."
        )
    return fxlora_alpha


def _read_sites(folder: str | os.PathLike[str]) -> tuple[_Config, dict[str, PeftSite], dict[str, Any], str]:
    config, tensors = read_adapter(folder)
    source = f"'{files.as_path(folder, 'PEFT adapter') / CONFIG_NAME}'"
    checked = validate_config(config, source)
    sites, others = adapter_sites(checked, tensors, source)
    return checked, sites, others, source


def peft_rules(folder: str | os.PathLike[str]) -> list[Rule]:
    """fxlora rules that reproduce a PEFT LoRA adapter: one exact-name rule per adapted module, with the
    rank of its tensors and the config's alpha."""
    config, sites, _, _ = _read_sites(folder)
    if not sites:
        raise CheckpointError(f"'{folder}' holds no LoRA tensors.")
    return [Rule(name, r=s.r, alpha=s.alpha, dropout=config.dropout) for name, s in sites.items()]


def peft_train_modules(folder: str | os.PathLike[str]) -> list[str]:
    """The modules a PEFT adapter trains in full (its ``modules_to_save``), by their full names in the
    model as the folder's tensors give them: pass them as ``train_modules=`` to :func:`fxlora.rewrite`
    (with :func:`peft_rules`) to load the folder."""
    config, _, others, _ = _read_sites(folder)
    return _trained_paths(config, others)


def _trained_paths(config: _Config, others: dict[str, Any]) -> list[str]:
    saved = config.raw.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    paths: list[str] = []
    for key in others:
        module = key.rpartition(".")[0]
        for name in saved:
            if module == name or module.endswith("." + name):
                if module not in paths:
                    paths.append(module)
    return paths


def _check_module_site(spec: SiteSpec, what: str) -> None:
    if spec.kind not in ("linear", "embedding", "conv"):
        raise CheckpointError(
            f"{what}: site '{spec.name}' is a {spec.kind} site; fxlora exchanges PEFT adapters for linear, embedding "
            "and convolution modules only (PEFT stores the factors of other kinds in layouts of its own). Save it with "
            "fxlora.save_lora instead, or leave the site out of the rules."
        )
    base = spec.lora_A.rpartition(".")[2]
    if spec.lora_A.rpartition(".")[0] != spec.name or not base.startswith("lora_A"):
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


def load_peft_adapter(gm: GraphModule, folder: str | os.PathLike[str], *, adapter: str | None = None) -> Any:
    """Load a PEFT LoRA adapter folder into ``gm`` (rewritten with :func:`peft_rules` or equivalent rules).

    Every adapted module of the file must be a site of ``gm`` with the same rank and scale, and the
    other way round; on any mismatch a :class:`CheckpointError` says what differs and nothing is loaded.
    The config and the weights are read from one version of the folder.  ``adapter`` names the adapter
    of ``gm`` to load into (default: its only adapter, or its only active one); the modules the folder
    trains in full (``modules_to_save``) load into that adapter's ``train_modules``.
    """
    name, sites = resolve_adapter(gm, adapter, "load_peft_adapter")
    config, file_sites, others, source = _read_sites(folder)
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
    state: dict[str, Any] = {}
    for site_name, spec in sites.items():
        _check_module_site(spec, "load_peft_adapter")
        site = file_sites[site_name]
        if site.r != spec.r or not math.isclose(site.scale, spec.scale, rel_tol=1e-6):
            raise CheckpointError(
                f"'{folder}' gives '{site_name}' r={site.r} and scale={site.scale:g}, the model has r={spec.r} and "
                f"scale={spec.scale:g}. Rewrite with fxlora.peft_rules(folder). Nothing was loaded."
            )
        if site.embedding != (spec.kind == "embedding"):
            raise CheckpointError(
                f"'{folder}' holds {'embedding' if site.embedding else 'linear/conv'} factors for '{site_name}', a "
                f"{spec.kind} site of the model. Nothing was loaded."
            )
        state[spec.lora_A], state[spec.lora_B] = site.lora_A, site.lora_B
    trained = adapter_state(gm).get("train_modules", {}).get(name, {})
    wanted = _trained_paths(config, others)
    if sorted(wanted) != sorted(trained):
        raise CheckpointError(
            f"'{folder}' trains {wanted or 'no module'} in full (modules_to_save), the model's adapter {name!r} trains "
            f"{sorted(trained) or 'none'}. Rewrite with train_modules=fxlora.peft_train_modules(folder). Nothing was loaded."
        )
    extra = []
    for key, value in others.items():  # the modules trained in full, then biases trained with bias=...
        module = next((p for p in trained if key.startswith(p + ".")), None)
        if module is not None:
            key = trained[module] + key[len(module):]
            extra.append(key)
        state[key] = value
    return load_into(gm, sites, state, strict=True, source=f"'{folder}'", extra=extra)


def adapter_files(
    specs: list[SiteSpec],
    tensors: dict[str, torch.Tensor],
    base_model_name_or_path: str | None,
    modules_to_save: list[str] | None = None,
) -> dict[str, bytes]:
    """The two files of a PEFT adapter folder for ``specs`` (one adapter's sites) and their LoRA tensors
    (keyed by the specs' ``lora_A`` / ``lora_B`` names), plus the tensors of ``modules_to_save`` (keyed
    ``<module>.<parameter>``)."""
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
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    weights = {}
    for spec in specs:
        a, b = tensors[spec.lora_A], tensors[spec.lora_B]
        if spec.kind == "embedding":
            weights[f"{PREFIX}{spec.name}.lora_embedding_A"], weights[f"{PREFIX}{spec.name}.lora_embedding_B"] = a, b
        else:
            weights[f"{PREFIX}{spec.name}.lora_A.weight"], weights[f"{PREFIX}{spec.name}.lora_B.weight"] = a, b
    for key, value in tensors.items():
        if any(key.startswith(p + ".") for p in modules_to_save or ()):
            weights[f"{PREFIX}{key}"] = value
    return {
        WEIGHTS_NAME: files.safetensors_bytes(weights, {"format": "pt"}),
        CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
    }


def save_peft_adapter(
    gm: GraphModule,
    folder: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    adapter: str | None = None,
) -> Path:
    """Write ``gm``'s LoRA tensors as a PEFT adapter folder.

    The config and the weights switch together: the new version of the folder is built beside it (the
    folder's other files, such as a README or tokenizer files, are kept) and exchanged with it in one
    step, so a reader or a crash sees the old adapter or the new one, and nothing is staged inside the
    folder.  New files get the umask's mode, replaced files keep theirs; a read-only folder or file is
    refused.  See :mod:`fxlora.files` and docs/reliability.md.  ``adapter`` is the adapter to save
    (default: the only one, or the only active one); the modules it trains in full are written as
    PEFT's ``modules_to_save``.  Works on a served module too (the adapter's slot).
    """
    name, sites = resolve_adapter(gm, adapter, "save_peft_adapter")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ArgumentError(
            f"save_peft_adapter(base_model_name_or_path=...) must be a string or None, got "
            f"{type(base_model_name_or_path).__name__}."
        )
    for spec in sites.values():
        _check_module_site(spec, "save_peft_adapter")
    specs = list(sites.values())
    state = lora_state_dict(gm, adapter=name)  # keys as the adapter alone would name them
    by_spec = {spec.lora_A: state[canonical_name(spec.lora_A, name)] for spec in specs}
    by_spec |= {spec.lora_B: state[canonical_name(spec.lora_B, name)] for spec in specs}
    trained = list(adapter_state(gm).get("train_modules", {}).get(name, {}))
    extra = {k: v for k, v in state.items() if any(k.startswith(p + ".") for p in trained)}
    tensors = tensors_for_file(by_spec | extra, f"the PEFT adapter '{folder}'")
    root = files.as_path(folder, "PEFT adapter")
    if is_writer():  # on a sharded module every rank gathers, rank 0 writes
        files.write_folder(root, adapter_files(specs, tensors, base_model_name_or_path, trained), what="PEFT adapter")
    return root
