"""Trainable flags and LoRA-only checkpoints of a rewritten graph module.

Which parameters are LoRA parameters is read from the graph (``node.meta["fxlora"]``), never guessed
from names.  Key names follow loralib: ``<module qualname>.lora_A`` / ``.lora_B``, so a loralib
checkpoint of the same model loads as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn.modules.module import _IncompatibleKeys

from .errors import ArgumentError, CheckpointError
from .lora import SiteSpec
from .provenance import active_adapters, adapter_state, adapters_of, require_sites

__all__ = [
    "lora_parameter_names",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "load_lora_state_dict",
    "save_lora",
    "load_lora",
]

BIAS_MODES = ("none", "all", "lora_only")
_FORMAT = "fxlora.lora/1"


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ArgumentError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {bias!r}.")


def lora_parameter_names(gm: GraphModule) -> list[str]:
    """Qualified names of every LoRA parameter, in graph order (``lora_A`` before ``lora_B``)."""
    return [name for spec in require_sites(gm, "lora_parameter_names").values() for name in (spec.lora_A, spec.lora_B)]


def _bias_names(gm: GraphModule, bias: str, sites: Mapping[str, SiteSpec]) -> list[str]:
    if bias == "none":
        return []
    if bias == "lora_only":
        return [spec.bias for spec in sites.values() if spec.bias is not None]
    return [name for name, _ in gm.named_parameters() if name.rpartition(".")[2] == "bias"]


def _private(gm: GraphModule, name: str) -> nn.Parameter:
    """The base parameter ``name`` with storage of its own (copy-on-write): rewrite shares the caller's
    weights, so a parameter fxlora will write (a trained or loaded bias) is first copied."""
    p = gm.get_parameter(name)
    if not getattr(p, "_fxlora_private", False):
        owner, _, attr = name.rpartition(".")
        p = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        p._fxlora_private = True  # type: ignore[attr-defined]
        setattr(gm.get_submodule(owner), attr, p)
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


def lora_state_dict(gm: GraphModule, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA tensors (and biases per ``bias``), keyed by their qualified names, detached."""
    _check_bias(bias)
    sites = require_sites(gm, "lora_state_dict")
    names = [n for spec in sites.values() for n in (spec.lora_A, spec.lora_B)] + _bias_names(gm, bias, sites)
    return {name: gm.get_parameter(name).detach() for name in dict.fromkeys(names)}


def load_lora_state_dict(
    gm: GraphModule, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> _IncompatibleKeys:
    """Load LoRA tensors (and optionally biases) into ``gm``, all or nothing: every key, shape, dtype and
    value is checked first, then all tensors are copied; on any problem nothing is loaded.

    With ``strict=True`` every LoRA parameter must be present and every key known; with
    ``strict=False`` the known keys present are loaded (still all or nothing) and the others reported.
    A ``*.bias`` key is accepted when ``gm`` has that bias.  Floating-point values are converted to the
    parameter's dtype.  Returns torch's ``(missing_keys, unexpected_keys)`` named tuple, as
    ``nn.Module.load_state_dict`` does.
    """
    sites = require_sites(gm, "load_lora_state_dict")
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"expected a mapping of names to tensors, got {type(state_dict).__name__}.")
    lora = [n for spec in sites.values() for n in (spec.lora_A, spec.lora_B)]
    params = dict(gm.named_parameters())
    biases = {n for n in params if n.rpartition(".")[2] == "bias"}
    missing = [n for n in lora if n not in state_dict]
    unexpected = [k for k in state_dict if k not in lora and k not in biases]
    problems = []
    if strict and missing:
        problems.append(f"missing LoRA keys: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if strict and unexpected:
        problems.append(
            f"unexpected keys: {', '.join(map(str, unexpected[:6]))}{' ...' if len(unexpected) > 6 else ''}"
        )
    by_param = {spec.lora_A: spec for spec in sites.values()} | {spec.lora_B: spec for spec in sites.values()}
    for key, value in state_dict.items():
        if key not in params or key in unexpected:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"'{key}' is a {type(value).__name__}, not a tensor")
            continue
        target = params[key]
        if tuple(value.shape) != tuple(target.shape):
            hint = ""
            spec = by_param.get(key)
            if spec is not None:
                hint = f" (the model's site '{spec.name}' has r={spec.r}; was the checkpoint trained with another rank?)"
            problems.append(f"'{key}' has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}{hint}")
        elif not value.is_floating_point():
            problems.append(f"'{key}' has dtype {value.dtype}; LoRA tensors must be floating point")
        elif value.device.type != "meta" and not bool(torch.isfinite(value).all()):
            problems.append(f"'{key}' holds NaN or Inf values")
    if problems:
        raise CheckpointError("cannot load the LoRA state dict, nothing was loaded: " + "; ".join(problems) + ".")
    lora_set = set(lora)
    with torch.no_grad():
        for key, value in state_dict.items():
            if key in unexpected:
                continue
            target = params[key] if key in lora_set else _private(gm, key)
            target.copy_(value)
    return _IncompatibleKeys(missing, unexpected)


def _metadata(sites: Mapping[str, SiteSpec]) -> dict[str, str]:
    return {
        "format": _FORMAT,
        "sites": json.dumps(
            {
                s.name: {"kind": s.kind, "r": s.r, "alpha": s.alpha, "enable_lora": s.enable_lora}
                for s in sites.values()
            }
        ),
    }


def save_lora(gm: GraphModule, path: str | os.PathLike[str], *, bias: str = "none") -> Path:
    """Write the LoRA state dict to a safetensors file, atomically (a temporary file, then a rename).

    The file's metadata records every site's kind, r, alpha and enable_lora, which :func:`load_lora`
    checks against the model.
    """
    from safetensors.torch import save_file

    sites = require_sites(gm, "save_lora")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in lora_state_dict(gm, bias).items()}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp.", suffix=path.suffix or ".tmp", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=_metadata(sites))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``-d state dict (loralib's format), read with ``weights_only=True``: tensors and
    plain containers only, so a malicious pickle cannot run code."""
    import pickle

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"'{path}' holds more than tensors (a pickle that would run code or build objects), so fxlora "
            f"refuses to unpickle it ({str(e).splitlines()[0]}). Nothing was loaded."
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not a readable torch checkpoint ({e}). Nothing was loaded.") from None
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise CheckpointError(f"'{path}' does not hold a state dict (a mapping of names to tensors).")
    return dict(data)


def load_lora(gm: GraphModule, path: str | os.PathLike[str], *, strict: bool = True) -> _IncompatibleKeys:
    """Load a LoRA checkpoint into ``gm``: a safetensors file written by :func:`save_lora` (its metadata
    is checked against the model), or a ``torch.save``-d state dict such as loralib's
    ``torch.save(lora.lora_state_dict(model), "ckpt.pt")``, read with ``weights_only=True``.  ``strict`` and
    the result are :func:`load_lora_state_dict`'s."""
    from safetensors import SafetensorError, safe_open

    sites = require_sites(gm, "load_lora")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no LoRA checkpoint at '{path}'.")
    if path.suffix in _PICKLE_SUFFIXES:
        return load_lora_state_dict(gm, _load_torch_file(path), strict=strict)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"'{path}' is not a readable safetensors file ({e}); it may be truncated or corrupted. Nothing was loaded."
        ) from None
    if metadata.get("format") == _FORMAT:
        try:
            saved = json.loads(metadata.get("sites", "{}"))
        except json.JSONDecodeError:
            raise CheckpointError(f"'{path}' has corrupted fxlora metadata. Nothing was loaded.") from None
        for name, spec in sites.items():
            info = saved.get(name)
            if info is None:
                continue
            mask = tuple(info["enable_lora"]) if info.get("enable_lora") is not None else None
            if info.get("alpha") != spec.alpha or info.get("r") != spec.r or mask != spec.enable_lora:
                raise CheckpointError(
                    f"'{path}' was trained with r={info.get('r')}, alpha={info.get('alpha')}, "
                    f"enable_lora={info.get('enable_lora')} at site '{name}', but the model has r={spec.r}, "
                    f"alpha={spec.alpha}, enable_lora={spec.enable_lora}. Rewrite with the checkpoint's rule. "
                    "Nothing was loaded."
                )
    return load_lora_state_dict(gm, tensors, strict=strict)
