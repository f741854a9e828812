"""Trainable flags and LoRA-only checkpoints of a rewritten graph module.

Which parameters are LoRA parameters is read from the graph (``node.meta["fxlora"]``), never guessed
from names.  Key names follow loralib: ``<module qualname>.lora_A`` / ``.lora_B``, so a loralib
checkpoint of the same model loads as it is.

Loading is all or nothing, in two phases: :func:`stage_tensors` checks every key and converts every
value into a new tensor of the target's dtype and device (and checks the *converted* values are
finite: a float64 1e39 is finite, but not as float32), then :func:`commit_tensors` copies the staged
tensors in.  Nothing is written until every tensor is known to fit.  The file helpers
(:func:`read_lora_file`, :func:`lora_file_bytes`, :func:`check_lora_metadata`) work on plain dicts of
tensors and metadata, so they serve one adapter or several.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn.modules.module import _IncompatibleKeys

from . import files
from .distributed import copy_into, full, is_sharded, is_writer, local_empty_like
from .errors import ArgumentError, CheckpointError
from .lora import KIND_NAMES, SiteSpec
from .passes import read_slot, write_slot
from .provenance import active_adapters, adapter_state, adapters_of, require_sites
from .resolution import canonical_name

__all__ = [
    "lora_parameter_names",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora",
    "load_lora",
    "load_into",
    "stage_tensors",
    "commit_tensors",
    "tensors_for_file",
    "lora_metadata",
    "check_lora_metadata",
    "lora_file_bytes",
    "read_lora_file",
    "SAVE_REFUSED_SUFFIXES",
    "adapter_sites",
    "adapter_key_map",
]

BIAS_MODES = ("none", "all", "lora_only")
_FORMAT = "fxlora.lora/1"
_KINDS = KIND_NAMES

#: Suffixes that promise a ``torch.save`` pickle: ``save_lora`` writes safetensors, so it refuses them
#: rather than write a file that ``torch.load`` cannot read and loralib users would not expect.
SAVE_REFUSED_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ArgumentError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {bias!r}.")


def lora_parameter_names(gm: GraphModule, adapter: str | None = None) -> list[str]:
    """Qualified names of the LoRA parameters of ``adapter`` (default: of every adapter), site by site
    (``lora_A`` before ``lora_B``), as they are in ``gm`` (the default adapter's are loralib's
    ``<site>.lora_A``; another adapter's carry its name, ``<site>.lora_A_<name>``)."""
    require_sites(gm, "lora_parameter_names")
    if _served_layouts(gm) is not None:  # one stack per site holds every served adapter
        if adapter is not None:
            adapter_sites(gm, adapter, "lora_parameter_names")
            return list(dict.fromkeys(q for layout in _served_layouts(gm).values() if adapter in layout.specs
                                      for q in (layout.A, layout.B)))
        return list(dict.fromkeys(q for layout in _served_layouts(gm).values() for q in (layout.A, layout.B)))
    names = [adapter] if adapter is not None else list(adapters_of(gm))
    if adapter is not None:
        adapter_sites(gm, adapter, "lora_parameter_names")
    return [n for name in names for spec in adapters_of(gm)[name].values() for n in (spec.lora_A, spec.lora_B)]


def adapter_sites(gm: GraphModule, adapter: str | None, what: str) -> tuple[str, dict[str, SiteSpec]]:
    """``(name, sites)`` of the adapter a state-dict function works on: ``adapter``, or when None the
    module's only adapter, or its only active one (else :class:`ArgumentError` asking for a name)."""
    require_sites(gm, what)
    adapters = adapters_of(gm)
    if adapter is None:
        active = active_adapters(gm)
        if len(adapters) == 1:
            adapter = next(iter(adapters))
        elif len(active) == 1:
            adapter = active[0]
        else:
            raise ArgumentError(
                f"{what}: this module has adapters {', '.join(map(repr, adapters))} ({len(active)} active); name one: "
                f"{what}(..., adapter='...')."
            )
    elif adapter not in adapters:
        raise ArgumentError(f"{what}: no adapter named {adapter!r}; this module has {', '.join(map(repr, adapters))}.")
    return adapter, dict(adapters[adapter])


def adapter_key_map(gm: GraphModule, adapter: str, sites: Mapping[str, SiteSpec]) -> dict[str, str]:
    """State-dict key -> parameter of ``gm``, for ``adapter``: the keys are what a graph rewritten with this
    adapter alone (as the default adapter) names its parameters, so an adapter's checkpoint loads into
    either; a module it trains in full appears under the module's own name."""
    mapping = {}
    for spec in sites.values():
        for qualname in (spec.lora_A, spec.lora_B):
            mapping[canonical_name(qualname, adapter)] = qualname
    for path, copy in adapter_state(gm).get("train_modules", {}).get(adapter, {}).items():
        for name, _ in gm.get_submodule(copy).named_parameters():
            mapping[f"{path}.{name}"] = f"{copy}.{name}"
    return mapping


def _served_layouts(gm: GraphModule) -> dict[str, Any] | None:
    served = (getattr(gm, "meta", {}).get("fxlora") or {}).get("served")
    return None if served is None else served["sites"]


def _bias_names(gm: GraphModule, bias: str, sites: Mapping[str, SiteSpec]) -> list[str]:
    if bias == "none":
        return []
    if bias == "lora_only":
        return [spec.bias for spec in sites.values() if spec.bias is not None]
    return [name for name, _ in gm.named_parameters() if name.rpartition(".")[2] == "bias"]


def _owned(p: torch.Tensor) -> bool:
    """Whether fxlora writes ``p`` in place (else :func:`_private` first gives it storage of its own)."""
    return bool(getattr(p, "_fxlora_private", False)) or is_sharded(p)


def _private(gm: GraphModule, name: str, replaced: list[tuple[nn.Module, str, nn.Parameter]] | None = None) -> nn.Parameter:
    """The base parameter ``name`` with storage of its own (copy-on-write): rewrite shares the caller's
    weights, so a parameter fxlora will write (a trained or loaded bias) is first copied, and the copy
    takes the original's place under every name it has in ``gm`` (a bias tied between two modules stays
    tied); each place replaced is appended to ``replaced`` as ``(module, attr, original)``.  A sharded
    parameter (FSDP2) already has storage of its own, and its module owns it: it is not replaced."""
    p = gm.get_parameter(name)
    if not _owned(p):
        new = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        new._fxlora_private = True  # type: ignore[attr-defined]
        for module in gm.modules():
            for attr, value in list(module._parameters.items()):
                if value is p:
                    module._parameters[attr] = new
                    if replaced is not None:
                        replaced.append((module, attr, p))
        p = new
    return p


def mark_only_lora_as_trainable(gm: GraphModule, bias: str = "none") -> None:
    """Freeze everything but the LoRA parameters of the *active* adapters; with ``bias="all"`` every
    ``*.bias`` also trains, with ``bias="lora_only"`` the biases of the active adapters' sites do
    (loralib's modes).  The mode is remembered: :func:`fxlora.set_adapter` applies it again.

    A bias made trainable is first given its own storage (a copy of a few kilobytes), so training never
    writes into the model that was passed to :func:`fxlora.rewrite`.
    """
    _check_bias(bias)
    require_sites(gm, "mark_only_lora_as_trainable")
    active = [spec for name in active_adapters(gm) for spec in adapters_of(gm)[name].values()]
    sites = {spec.name: spec for spec in active}
    lora = {name for spec in active for name in (spec.lora_A, spec.lora_B)}
    trained = adapter_state(gm).get("train_modules", {})
    lora |= {f"{copy}.{n}" for name in active_adapters(gm) for copy in trained.get(name, {}).values()
             for n, _ in gm.get_submodule(copy).named_parameters()}
    train_bias = set(_bias_names(gm, bias, sites))
    adapter_state(gm)["bias"] = bias
    for name, p in list(gm.named_parameters()):
        if name in lora:
            p.requires_grad_(True)
        elif name in train_bias:
            _private(gm, name).requires_grad_(True)
        else:
            p.requires_grad_(False)


def lora_state_dict(gm: GraphModule, bias: str = "none", *, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's LoRA tensors (and biases per ``bias``, and the modules it trains in full), detached.

    The keys are loralib's, ``<site>.lora_A`` / ``<site>.lora_B``, whichever adapter it is (as PEFT strips
    adapter names from its keys), so ``lora_state_dict(gm, adapter="b")`` loads into a module rewritten
    with adapter ``b`` alone, and the other way round.  ``adapter`` defaults to the module's only adapter
    (or its only active one).  On a served module (:func:`fxlora.serve`) the tensors are read from the
    adapter's slot of the stacked factors.
    """
    _check_bias(bias)
    name, sites = adapter_sites(gm, adapter, "lora_state_dict")
    if _served_layouts(gm) is not None:
        out = {canonical_name(k, name): v.detach() for k, v in read_slot(gm, name).items()}
    else:  # on a sharded module (FSDP2) every rank gathers the full tensors
        out = {key: full(gm.get_parameter(param)).detach() for key, param in adapter_key_map(gm, name, sites).items()}
    for bias_name in _bias_names(gm, bias, sites):
        out.setdefault(bias_name, full(gm.get_parameter(bias_name)).detach())
    return out


# --------------------------------------------------------------------------------------------- #
# loading: stage every tensor, then commit
# --------------------------------------------------------------------------------------------- #


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _storage_covers(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds every element its sizes and strides address (a storage resized
    to zero, as FSDP does to freed parameters, would make a copy read outside it)."""
    if t.numel() == 0:
        return True
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return min(t.stride(), default=0) >= 0 and (last + 1) * t.element_size() <= t.untyped_storage().nbytes()


def _stage_one(key: str, value: Any, target: torch.Tensor, hint: str) -> tuple[str | None, torch.Tensor | None]:
    """``(problem, None)`` or ``(None, staged)``: ``value`` converted into a new tensor like ``target``."""
    if not isinstance(value, torch.Tensor):
        return f"'{key}' is a {type(value).__name__}, not a tensor", None
    try:
        if value.is_nested:
            return (
                f"'{key}' is a nested tensor (several tensors in one); a LoRA tensor must be one dense tensor of the "
                "parameter's shape"
            ), None
        if value.layout != torch.strided:
            return f"'{key}' is a {value.layout} tensor; LoRA tensors must be dense (save value.to_dense())", None
        if value.is_quantized:
            return f"'{key}' is a quantized tensor; LoRA tensors must be plain floating point", None
        if value.device.type == "meta":
            return (
                f"'{key}' is a meta tensor: it has a shape but no values (the checkpoint was made from a model "
                "on the meta device)"
            ), None
        if tuple(value.shape) != tuple(target.shape):
            return f"'{key}' has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}{hint}", None
        if not value.is_floating_point():
            return f"'{key}' has dtype {value.dtype}; LoRA tensors must be floating point", None
        if target.device.type == "meta":
            return (
                f"the model's '{key}' is on the meta device (it has no storage to load into); materialize the "
                "model first (model.to_empty(device=...))"
            ), None
        if not _storage_covers(value):
            return f"'{key}' addresses memory outside its storage (freed or resized); it cannot be read", None
        staged = local_empty_like(target)  # the full shape, even for a sharded (FSDP2) target
        staged.copy_(value.detach())
    except Exception as e:  # noqa: BLE001 - an unreadable device, an odd tensor subclass...
        return f"'{key}' cannot be read into the model's {target.dtype} on {target.device} ({_first_line(e)})", None
    if not bool(torch.isfinite(staged).all()):
        try:
            source_finite = bool(torch.isfinite(value.detach()).all())
            peak = float(value.detach().abs().max()) if source_finite else math.nan
        except Exception:  # noqa: BLE001
            source_finite, peak = False, math.nan
        if source_finite:
            return (
                f"'{key}' holds values that {target.dtype} cannot represent (largest magnitude {peak:.4g}; "
                f"{target.dtype} reaches {torch.finfo(target.dtype).max:.4g}): they would load as Inf"
            ), None
        return f"'{key}' holds NaN or Inf values", None
    return None, staged


def stage_tensors(
    targets: Mapping[str, torch.Tensor], values: Mapping[str, Any], *, hints: Mapping[str, str] | None = None,
    source: str = "the LoRA state dict",
) -> dict[str, torch.Tensor]:
    """Every ``values[key]`` checked against ``targets[key]`` and converted into a new tensor of its dtype
    and device; the converted values must be finite.  Nothing is written anywhere.  On any problem a
    :class:`CheckpointError` lists every one (``hints`` adds a sentence per key)."""
    staged, problems = _stage_all(targets, values, hints or {})
    if problems:
        raise CheckpointError(f"cannot load {source}, nothing was loaded: " + "; ".join(problems) + ".")
    return staged


def _stage_all(
    targets: Mapping[str, torch.Tensor], values: Mapping[str, Any], hints: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    problems: list[str] = []
    staged: dict[str, torch.Tensor] = {}
    for key, value in values.items():
        problem, tensor = _stage_one(key, value, targets[key], hints.get(key, ""))
        if problem is not None:
            problems.append(problem)
        else:
            assert tensor is not None
            staged[key] = tensor
    return staged, problems


def _unwritable(gm: GraphModule, keys: list[str], source: str) -> CheckpointError | None:
    """The error to raise before any copy when some of ``keys`` cannot be written in place here.  An
    inference tensor (made under ``torch.inference_mode()``) refuses in-place updates outside that
    mode, and only after the kernel has written."""
    if torch.is_inference_mode_enabled():
        return None
    frozen = [key for key in keys if gm.get_parameter(key).is_inference()]
    if not frozen:
        return None
    names = ", ".join(map(repr, frozen[:6])) + (" ..." if len(frozen) > 6 else "")
    return CheckpointError(
        f"cannot load {source}, nothing was loaded: the model's {names} "
        f"{'are inference tensors' if len(frozen) > 1 else 'is an inference tensor'} (the model was built under torch.inference_mode()), which cannot be updated in place outside that mode. "
        "Load inside `with torch.inference_mode():`, or build the model outside it."
    )


def _inference_if(flag: bool) -> Any:
    """``torch.inference_mode()`` when ``flag`` (an inference tensor is written only there), else nothing:
    ``inference_mode(False)`` would turn gradients back on."""
    return torch.inference_mode() if flag else contextlib.nullcontext()


def _restore(journal: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[str]:
    """Copy every backup of ``journal`` (key, target, backup) back, newest first; the keys that could not
    be restored bit for bit."""
    failed = []
    for key, target, backup in reversed(journal):
        with contextlib.suppress(Exception), _inference_if(target.is_inference()):
            target.copy_(backup)  # checked below: some copies write, then raise
        try:
            same = bool(torch.equal(target.detach(), backup))
        except Exception:  # noqa: BLE001
            same = False
        if not same:
            failed.append(key)
    return failed


def _failed_copy(what: str, e: BaseException, unrestored: list[str]) -> CheckpointError:
    """The error for a copy of ``what`` that failed; ``unrestored``: what the rollback could not restore."""
    if not unrestored:
        return CheckpointError(f"copying {what} into the model failed ({_first_line(e)}); nothing was loaded.")
    return CheckpointError(
        f"copying {what} into the model failed ({_first_line(e)}), and {', '.join(unrestored)} could not be "
        "restored: they may hold new values. Load the checkpoint again, or reload the model."
    )


def commit_tensors(
    gm: GraphModule, staged: Mapping[str, torch.Tensor], lora_names: set[str], *, source: str = "the LoRA state dict"
) -> None:
    """Copy the staged tensors into ``gm`` (a bias first gets storage of its own, see
    :func:`mark_only_lora_as_trainable`), all or nothing: every target is checked to be writable first,
    and each is backed up *before* its copy starts, so a copy that writes and then raises is undone
    too; a bias given its own storage gets its original parameter back."""
    with torch.no_grad():
        in_place = [key for key in staged if key in lora_names or _owned(gm.get_parameter(key))]
        refusal = _unwritable(gm, in_place, source)
        if refusal is not None:
            raise refusal
        journal: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        replaced: list[tuple[nn.Module, str, nn.Parameter]] = []
        key = ""
        try:
            for key, value in staged.items():
                target = gm.get_parameter(key)
                if key not in lora_names and not _owned(target):
                    target = _private(gm, key, replaced)  # its places are put back on failure; never written
                else:
                    journal.append((key, target, target.detach().clone()))  # backed up before the copy starts
                copy_into(target, value)  # a sharded target takes this rank's shard
        except Exception as e:  # noqa: BLE001 - roll back, then report
            unrestored = _restore(journal)
            for owner, attr, original in reversed(replaced):
                setattr(owner, attr, original)
            raise _failed_copy(f"'{key}'", e, [f"'{k}'" for k in unrestored]) from None


def load_into(
    gm: GraphModule, sites: Mapping[str, SiteSpec], state_dict: Any, *, strict: bool, source: str,
    extra: list[str] | tuple[str, ...] = (),
) -> _IncompatibleKeys:
    """Load ``state_dict`` into the LoRA parameters of ``sites`` (one adapter's), the parameters named in
    ``extra`` (the modules it trains in full) and the biases of ``gm``: keys checked, every tensor staged
    (:func:`stage_tensors`), then committed.  ``source`` names the checkpoint in errors."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a mapping of names to tensors, got {type(state_dict).__name__}.")
    lora = [n for spec in sites.values() for n in (spec.lora_A, spec.lora_B)] + [n for n in extra]
    lora_set = set(lora)
    params = dict(gm.named_parameters())
    biases = {n for n in params if n.rpartition(".")[2] == "bias"}
    missing = [n for n in lora if n not in state_dict]
    unexpected = [k for k in state_dict if k not in lora_set and k not in biases]
    problems = []
    if strict and missing:
        problems.append(f"missing LoRA keys: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if strict and unexpected:
        problems.append(
            f"unexpected keys: {', '.join(map(str, unexpected[:6]))}{' ...' if len(unexpected) > 6 else ''}"
        )
    by_param = {spec.lora_A: spec for spec in sites.values()} | {spec.lora_B: spec for spec in sites.values()}
    hints = {
        name: f" (the model's site '{spec.name}' has r={spec.r}; was the checkpoint trained with another rank?)"
        for name, spec in by_param.items()
    }
    known = {k: v for k, v in state_dict.items() if k not in unexpected}
    staged, value_problems = _stage_all({k: params[k] for k in known}, known, hints)
    problems += value_problems
    if problems:
        raise CheckpointError(f"cannot load {source}, nothing was loaded: " + "; ".join(problems) + ".")
    commit_tensors(gm, staged, lora_set, source=source)
    return _IncompatibleKeys(missing, unexpected)


def load_lora_state_dict(
    gm: GraphModule, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True, adapter: str | None = None
) -> _IncompatibleKeys:
    """Load LoRA tensors (and optionally biases) into ``gm``, all or nothing: every key, shape and dtype is
    checked and every value converted to the parameter's dtype and device first (the converted values
    must be finite: 1e39 does not fit float32, 1e5 does not fit float16); only then are the tensors
    copied.  Meta, sparse, quantized and unreadable tensors are refused.  On any problem a
    :class:`CheckpointError` names every key at fault and nothing is loaded.

    With ``strict=True`` every LoRA parameter must be present and every key known; with
    ``strict=False`` the known keys present are loaded (still all or nothing) and the others reported.
    A ``*.bias`` key is accepted when ``gm`` has that bias.  Returns torch's ``(missing_keys,
    unexpected_keys)`` named tuple, as ``nn.Module.load_state_dict`` does.

    The keys and ``adapter`` are :func:`lora_state_dict`'s: any adapter's checkpoint loads into any
    adapter with the same sites and shapes (into a served module's slot in place: no graph change).
    """
    name, sites = adapter_sites(gm, adapter, "load_lora_state_dict")
    return load_adapter(gm, name, sites, state_dict, strict=strict, source="the LoRA state dict")


def load_adapter(
    gm: GraphModule, adapter: str, sites: Mapping[str, SiteSpec], state_dict: Any, *, strict: bool, source: str
) -> _IncompatibleKeys:
    """Load ``state_dict`` (keys as :func:`lora_state_dict` gives them) into ``adapter`` of ``gm``."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a mapping of names to tensors, got {type(state_dict).__name__}.")
    if _served_layouts(gm) is not None:
        return _load_slot(gm, adapter, sites, state_dict, strict=strict, source=source)
    mapping = adapter_key_map(gm, adapter, sites)
    back = {v: k for k, v in mapping.items()}
    renamed: dict[Any, Any] = {}
    origin: dict[Any, Any] = {}
    clashes = []
    for key, value in state_dict.items():
        param = mapping.get(key, key) if isinstance(key, str) else key
        if param in origin:
            clashes.append(f"'{origin[param]}' and '{key}' both name the parameter '{param}'")
        origin[param] = key
        renamed[param] = value
    if clashes:
        raise CheckpointError(
            f"cannot load {source}, nothing was loaded: " + "; ".join(clashes[:6]) + (" ..." if len(clashes) > 6 else "")
            + ". Keep one key per parameter (lora_state_dict's keys are the unsuffixed '<site>.lora_A')."
        )
    trained = [p for p in mapping.values() if p not in _lora_names(sites)]  # modules trained in full
    result = load_into(gm, sites, renamed, strict=strict, source=source, extra=trained)
    return _IncompatibleKeys([back.get(k, k) for k in result.missing_keys], [back.get(k, k) for k in result.unexpected_keys])


def _lora_names(sites: Mapping[str, SiteSpec]) -> set[str]:
    return {n for spec in sites.values() for n in (spec.lora_A, spec.lora_B)}


def _load_slot(
    gm: GraphModule, adapter: str, sites: Mapping[str, SiteSpec], state_dict: Mapping[str, Any], *, strict: bool,
    source: str,
) -> _IncompatibleKeys:
    """Load one adapter's factors into its slot of a served module's stacks, in place."""
    current = read_slot(gm, adapter)
    targets = {canonical_name(k, adapter): v for k, v in current.items()}
    missing = [k for k in targets if k not in state_dict]
    params = dict(gm.named_parameters())
    unexpected = [k for k in state_dict if k not in targets and not (k in params and k.endswith(".bias"))]
    if strict and (missing or unexpected):
        parts = [f"missing LoRA keys: {', '.join(missing[:6])}"] if missing else []
        parts += [f"unexpected keys: {', '.join(map(str, unexpected[:6]))}"] if unexpected else []
        raise CheckpointError(f"cannot load {source}, nothing was loaded: " + "; ".join(parts) + ".")
    known = {k: v for k, v in state_dict.items() if k in targets}
    staged = stage_tensors({k: targets[k] for k in known}, known, source=source)
    biases = {k: v for k, v in state_dict.items() if k not in targets and k not in unexpected}
    staged_biases = stage_tensors({k: params[k] for k in biases}, biases, source=source)
    stacks = list(dict.fromkeys(q for layout in (_served_layouts(gm) or {}).values() for q in (layout.A, layout.B)))
    refusal = _unwritable(gm, stacks, source)
    if refusal is not None:
        raise refusal
    backup = {k: v.detach().clone() for k, v in current.items()}  # taken before anything is written
    try:
        write_slot(gm, adapter, {k: staged[canonical_name(k, adapter)] for k in current if canonical_name(k, adapter) in staged})
        commit_tensors(gm, staged_biases, set(), source=source)  # all or nothing itself
    except Exception as e:  # put the slot back, then report
        try:
            with _inference_if(any(gm.get_parameter(q).is_inference() for q in stacks)):
                write_slot(gm, adapter, backup)
            restored = all(torch.equal(v, backup[k]) for k, v in read_slot(gm, adapter).items())
        except Exception:  # noqa: BLE001
            restored = False
        if isinstance(e, CheckpointError) and restored:
            raise
        what = f"adapter {adapter!r}'s factors"
        raise _failed_copy(what, e, [] if restored else [f"{what} (in its slot of the stacks)"]) from None
    return _IncompatibleKeys(missing, unexpected)


# --------------------------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------------------------- #


def lora_metadata(sites: Mapping[str, SiteSpec]) -> dict[str, str]:
    """fxlora's safetensors metadata for ``sites``: the format and each site's kind, r, alpha and mask."""
    return {
        "format": _FORMAT,
        "sites": json.dumps(
            {
                s.name: {
                    "kind": s.kind,
                    "r": s.r,
                    "alpha": s.alpha,
                    "enable_lora": list(s.enable_lora) if s.enable_lora is not None else None,
                }
                for s in sites.values()
            }
        ),
    }


def _check_site_record(name: str, info: Any, where: str) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: site '{name}' must be an object, got {type(info).__name__}.")
    fields = {"kind", "r", "alpha", "enable_lora"}
    unknown = sorted(set(info) - fields)
    if unknown or set(info) != fields:
        raise CheckpointError(
            f"{where}: site '{name}' must have exactly the fields {sorted(fields)}; "
            + (f"unknown {unknown}." if unknown else f"missing {sorted(fields - set(info))}.")
        )
    kind, r, alpha, mask = info["kind"], info["r"], info["alpha"], info["enable_lora"]
    if kind not in _KINDS:
        raise CheckpointError(f"{where}: site '{name}' field 'kind' must be one of {list(_KINDS)}, got {kind!r}.")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= 1 << 20:
        raise CheckpointError(f"{where}: site '{name}' field 'r' must be a positive int (at most 2**20), got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise CheckpointError(f"{where}: site '{name}' field 'alpha' must be a positive finite number, got {alpha!r}.")
    if mask is not None and (
        not isinstance(mask, list) or not mask or not all(isinstance(b, bool) for b in mask) or not any(mask)
        or len(mask) > 1024
    ):
        raise CheckpointError(
            f"{where}: site '{name}' field 'enable_lora' must be null or a list of booleans with at least one true, "
            f"got {mask!r}."
        )
    return info


def check_lora_metadata(metadata: Mapping[str, str], sites: Mapping[str, SiteSpec], source: str) -> None:
    """Validate fxlora's metadata in a checkpoint (every field: types, ranges, depth) and check it
    against the model's ``sites``: same kind, r, alpha and enable_lora for every site both have.
    Metadata that is not fxlora's (``format`` absent or another tool's) is not checked."""
    fmt = metadata.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("fxlora."):
        return
    where = f"{source} (fxlora metadata)"
    if fmt != _FORMAT:
        raise CheckpointError(
            f"{where}: field 'format' is {fmt!r}; this fxlora reads {_FORMAT!r}. Upgrade fxlora. Nothing was loaded."
        )
    if "sites" not in metadata:
        raise CheckpointError(f"{where}: field 'sites' is missing; the file is corrupted. Nothing was loaded.")
    saved = files.parse_json(metadata["sites"], source=f"{where} field 'sites'")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: field 'sites' must be a JSON object, got {type(saved).__name__}.")
    for name, info in saved.items():
        _check_site_record(name, info, where)
    for name, spec in sites.items():
        info = saved.get(name)
        if info is None:
            continue
        mask = tuple(info["enable_lora"]) if info["enable_lora"] is not None else None
        if (info["kind"], info["r"], mask) != (spec.kind, spec.r, spec.enable_lora) or info["alpha"] != spec.alpha:
            raise CheckpointError(
                f"{source} was trained with r={info['r']}, alpha={info['alpha']}, enable_lora={info['enable_lora']} "
                f"({info['kind']}) at site '{name}', but the model has r={spec.r}, alpha={spec.alpha}, "
                f"enable_lora={list(spec.enable_lora) if spec.enable_lora else None} ({spec.kind}). Rewrite with "
                "the checkpoint's rule. Nothing was loaded."
            )


def tensors_for_file(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Dense, contiguous CPU copies of ``tensors``, refusing any that could not be read back (meta,
    sparse, non-finite): every file fxlora writes, it reads back."""
    out: dict[str, torch.Tensor] = {}
    problems = []
    for key, value in tensors.items():
        try:
            if value.device.type == "meta":
                problems.append(f"'{key}' is on the meta device (no values)")
                continue
            if value.layout != torch.strided:
                problems.append(f"'{key}' is a {value.layout} tensor")
                continue
            copy = value.detach().to("cpu").contiguous().clone()
        except Exception as e:  # noqa: BLE001
            problems.append(f"'{key}' cannot be read ({_first_line(e)})")
            continue
        if copy.is_floating_point() and not bool(torch.isfinite(copy).all()):
            problems.append(f"'{key}' holds NaN or Inf values (did training diverge?)")
            continue
        out[key] = copy
    if problems:
        raise CheckpointError(f"cannot save {what}, nothing was written: " + "; ".join(problems) + ".")
    return out


def lora_file_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file holding ``tensors`` (as :func:`tensors_for_file` returns) and ``metadata``."""
    return files.safetensors_bytes(dict(tensors), dict(metadata))


def read_lora_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` from one read of ``path``: a safetensors file or a ``torch.save``-d state
    dict (read with ``weights_only=True``), told apart by their first bytes, whatever the name says."""
    p = files.as_path(path, "LoRA checkpoint")
    if p.is_dir() and (p / "adapter_config.json").is_file():
        raise CheckpointError(f"'{p}' is a PEFT adapter folder; load it with fxlora.load_peft_adapter(gm, folder).")
    data = files.read_file(p, what="LoRA checkpoint")
    return files.parse_tensor_file(data, source=f"'{p}'")


def _check_save_path(path: Any) -> Path:
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise CheckpointError(f"save_lora: the path must be a str or os.PathLike, got {type(path).__name__}.") from None
    if p.suffix.lower() in SAVE_REFUSED_SUFFIXES:
        raise CheckpointError(
            f"save_lora writes safetensors, but '{p}' ends in {p.suffix!r}, which promises a torch.save pickle. "
            f"Name it '{p.with_suffix('.safetensors')}', or write loralib's format yourself with "
            "torch.save(fxlora.lora_state_dict(gm), path) (load_lora reads both). Nothing was written."
        )
    return p


def save_lora(
    gm: GraphModule, path: str | os.PathLike[str], *, bias: str = "none", adapter: str | None = None
) -> Path:
    """Write the LoRA state dict to a safetensors file, atomically: the target is replaced by a complete
    temporary file, so a reader or a crash sees the old file or the new one, never a torn one.

    The file's metadata records every site's kind, r, alpha and enable_lora, which :func:`load_lora`
    checks against the model.  A name ending in ``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pkl`` or
    ``.pickle`` is refused (:data:`SAVE_REFUSED_SUFFIXES`): those promise a ``torch.save`` pickle.  A new
    file gets the umask's mode, a replaced file keeps its mode, and a read-only target is refused; see
    :mod:`fxlora.files`.  ``adapter`` and the keys are :func:`lora_state_dict`'s.  On a module sharded
    across processes (FSDP2) call it on every rank: every rank gathers the tensors, rank 0 writes.
    """
    _check_bias(bias)
    name, sites = adapter_sites(gm, adapter, "save_lora")
    p = _check_save_path(path)
    tensors = tensors_for_file(lora_state_dict(gm, bias, adapter=name), f"'{p}'")
    if is_writer():  # on a sharded module every rank gathers, rank 0 writes
        files.write_file(p, lora_file_bytes(tensors, lora_metadata(sites)), what="LoRA checkpoint")
    return p


def load_lora(
    gm: GraphModule, path: str | os.PathLike[str], *, strict: bool = True, adapter: str | None = None
) -> _IncompatibleKeys:
    """Load a LoRA checkpoint into ``gm``, all or nothing: a safetensors file written by :func:`save_lora`
    (its metadata is validated and checked against the model), or a ``torch.save``-d state dict such
    as loralib's ``torch.save(lora.lora_state_dict(model), "ckpt.pt")``, read with
    ``weights_only=True``.  The format is read from the file's first bytes, not its name, and the
    file is read once, so its metadata and tensors come from one version even while another process
    saves to it.  ``strict``, ``adapter`` and the result are :func:`load_lora_state_dict`'s."""
    name, sites = adapter_sites(gm, adapter, "load_lora")
    tensors, metadata = read_lora_file(path)
    check_lora_metadata(metadata, sites, f"'{path}'")
    return load_adapter(gm, name, sites, tensors, strict=strict, source=f"'{path}'")
