"""Rules: which sites get LoRA, and with what rank, alpha, dropout and layout.

A rule's ``target`` has one meaning per type:

* ``str`` without the ``re:`` prefix is a glob over module qualified names, matched with
  :func:`fnmatch.fnmatchcase` against the *whole* name (``"blocks.1.*"`` never selects
  ``blocks.10.q``).  A glob with no wildcard (``* ? [``) is an *exact name*.
* ``str`` with the ``re:`` prefix is a regular expression matched with :func:`re.fullmatch`.
* a ``type`` (a subclass of ``torch.nn.Module``) selects every module that is an instance of it.

Precedence, when several rules select one site (as in FX quantization's qconfig mapping): an exact
name beats a pattern (glob or regex), which beats a type; within one tier the rule listed first wins.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

#: The range of a LoRA scale (alpha / r): normal float32 numbers, so that the branch neither rounds to
#: zero (a config with alpha 1e-50 would load as an adapter that does nothing) nor overflows.
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

from .errors import RuleError
from .patterns import PatternBudget, compile_pattern, try_compile

__all__ = ["Rule", "as_rules", "load_rules", "rules_from_data", "module_targets", "target_matches"]

_GLOB_CHARS = frozenset("*?[")

#: Precedence tiers: lower wins.
TIER_EXACT, TIER_PATTERN, TIER_TYPE = 0, 1, 2


@dataclass(frozen=True)
class Rule:
    """Select sites by ``target`` and give them LoRA of rank ``r`` with ``scale = alpha / r``.

    Args:
        target: a glob over module qualified names, ``"re:<regex>"``, or an ``nn.Module`` subclass.
        r: the rank, a positive int.
        alpha: the LoRA alpha, a positive number; the branch is scaled by ``alpha / r``.
        dropout: dropout probability on the branch's input, in ``[0, 1)``; not applied at Embedding
            sites, whose inputs are indices (as in loralib and PEFT).
        enable_lora: for a fused projection (qkv), one bool per equal slice of the output features;
            only the enabled slices are adapted (loralib's ``MergedLinear``).
        fan_in_fan_out: the weight is stored ``(in, out)`` and the site computes ``x @ W + b``
            (GPT-2's ``Conv1D``).  ``None`` (the default) reads the layout from the graph for
            functional sites (``torch.addmm(b, x, W)``, ``x @ W``) and takes ``(out, in)`` for modules;
            ``True``/``False`` state it, and a graph that says otherwise is an error.
    """

    target: str | type
    r: int = field(kw_only=True)
    alpha: float = field(kw_only=True)
    dropout: float = field(default=0.0, kw_only=True)
    enable_lora: tuple[bool, ...] | None = field(default=None, kw_only=True)
    fan_in_fan_out: bool | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        t = self.target
        if isinstance(t, str):
            if not t or t == "re:":
                raise RuleError(f"{self!r}: target is empty; give a module name, a glob, 're:<regex>' or a module type.")
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise RuleError(f"{self!r}: {t[3:]!r} is not a valid regular expression ({e}).") from None
        elif not (isinstance(t, type) and issubclass(t, torch.nn.Module)):
            raise RuleError(
                f"Rule target {t!r} is a {type(t).__name__}; give a module name or glob (str), "
                "'re:<regex>', or an nn.Module subclass such as torch.nn.Linear."
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise RuleError(f"{self!r}: r must be a positive int (the LoRA rank), got {self.r!r}.")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise RuleError(f"{self!r}: alpha must be a positive finite number (scale = alpha / r), got {self.alpha!r}.")
        if not FLOAT32_TINY <= self.alpha / self.r <= FLOAT32_MAX:
            raise RuleError(
                f"{self!r}: the scale alpha / r = {self.alpha / self.r!r} is not a normal float32 number (from "
                f"{FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}): the branch would be rounded to zero or overflow. "
                "Give an alpha of the order of r (alpha = r or 2 r is usual)."
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise RuleError(f"{self!r}: dropout must be in [0, 1), got {self.dropout!r}.")
        if self.enable_lora is not None:
            mask = self.enable_lora
            if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence) or not all(
                isinstance(b, bool) for b in mask
            ):
                raise RuleError(
                    f"{self!r}: enable_lora must be a list of bools, one per slice of a fused "
                    "projection, e.g. [True, False, True] for the q and v thirds of a qkv Linear."
                )
            if not mask:
                raise RuleError(f"{self!r}: enable_lora is empty; give one bool per slice of the fused output.")
            if not any(mask):
                raise RuleError(f"{self!r}: enable_lora has no True entry, so the rule would adapt nothing.")
            object.__setattr__(self, "enable_lora", tuple(mask))
        if self.fan_in_fan_out is not None and not isinstance(self.fan_in_fan_out, bool):
            raise RuleError(f"{self!r}: fan_in_fan_out must be True, False or None, got {self.fan_in_fan_out!r}.")

    # -- matching ------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def tier(self) -> int:
        t = self.target
        if isinstance(t, type):
            return TIER_TYPE
        if t.startswith("re:") or _GLOB_CHARS & set(t):
            return TIER_PATTERN
        return TIER_EXACT

    @property
    def target_text(self) -> str:
        t = self.target
        return f"{t.__module__}.{t.__qualname__}" if isinstance(t, type) else t

    def matches_name(self, name: str) -> bool:
        """Whether this rule's name pattern selects ``name`` (always False for type rules)."""
        return not isinstance(self.target, type) and target_matches(self.target, name, None)

    def matches_type(self, module_type: type | None) -> bool:
        """Whether this type rule selects modules of ``module_type`` (always False for name rules)."""
        return isinstance(self.target, type) and module_type is not None and issubclass(module_type, self.target)

    def __repr__(self) -> str:
        t = self.target_text if isinstance(self.target, type) else repr(self.target)
        extra = ""
        if self.dropout:
            extra += f", dropout={self.dropout}"
        if self.enable_lora is not None:
            extra += f", enable_lora={self.enable_lora!r}"
        if self.fan_in_fan_out is not None:
            extra += f", fan_in_fan_out={self.fan_in_fan_out}"
        return f"Rule({t}, r={self.r}, alpha={self.alpha}{extra})"


def module_targets(targets: object, what: str = "train_modules") -> tuple[str | type, ...]:
    """Validate module targets written like a rule's (a glob, ``"re:<regex>"`` or an ``nn.Module``
    subclass): a sequence of them, or None for none."""
    if targets is None:
        return ()
    if isinstance(targets, (str, type)) or not isinstance(targets, Sequence):
        targets = [targets]
    out = []
    for i, t in enumerate(targets):
        if isinstance(t, str):
            if not t or t == "re:":
                raise RuleError(f"{what}[{i}] is empty; give a module name, a glob, 're:<regex>' or a module type.")
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise RuleError(f"{what}[{i}]: {t[3:]!r} is not a valid regular expression ({e}).") from None
        elif not (isinstance(t, type) and issubclass(t, torch.nn.Module)):
            raise RuleError(f"{what}[{i}] is {t!r}; give a module name or glob, 're:<regex>', or an nn.Module subclass.")
        out.append(t)
    return tuple(out)


def target_matches(target: str | type, name: str, module_type: type | None) -> bool:
    """Whether a rule-style ``target`` selects the module ``name`` of ``module_type``."""
    if isinstance(target, type):
        return module_type is not None and issubclass(module_type, target)
    if target.startswith("re:"):
        linear = try_compile(target[3:])  # linear time; re only for constructs it cannot take (lookarounds)
        return linear.fullmatch(name) if linear is not None else re.fullmatch(target[3:], name) is not None
    return fnmatch.fnmatchcase(name, target)


def as_rules(rules: Rule | Sequence[Rule]) -> list[Rule]:
    """Normalize the ``rules`` argument: one :class:`Rule` or a sequence of them."""
    if isinstance(rules, Rule):
        return [rules]
    if isinstance(rules, (str, bytes, type)) or not isinstance(rules, Sequence):
        raise RuleError(
            f"rules must be a Rule or a list of Rule, got {type(rules).__name__}; "
            "e.g. fxlora.rewrite(model, [fxlora.Rule('*.q', r=8, alpha=16)])."
        )
    out = list(rules)
    if not out:
        raise RuleError("rules is empty: give at least one fxlora.Rule.")
    for i, rule in enumerate(out):
        if not isinstance(rule, Rule):
            raise RuleError(f"rules[{i}] is a {type(rule).__name__}, not an fxlora.Rule.")
    return out


_RULE_KEYS = {"target", "type", "r", "alpha", "dropout", "enable_lora", "fan_in_fan_out"}


def _import_type(path: str, where: str) -> type:
    import importlib

    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise RuleError(f"{where}: type = {path!r} is not a dotted import path such as 'torch.nn.Linear'.")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise RuleError(f"{where}: cannot import type {path!r} ({e}).") from None
    if not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        raise RuleError(f"{where}: {path!r} is not an nn.Module subclass.")
    return obj


def rules_from_data(data: object, source: str = "rules") -> list[Rule]:
    """Rules from parsed TOML (or JSON): ``{"rule": [{"target": ..., "r": ..., "alpha": ...}, ...]}``.

    Each table mirrors :class:`Rule`; a module type is given as ``type = "torch.nn.Linear"`` in place of
    ``target``.  Unknown keys, missing keys and wrong types raise :class:`RuleError`.
    """
    if not isinstance(data, dict):
        raise RuleError(f"{source}: expected a table with [[rule]] entries.")
    unknown = set(data) - {"rule"}
    if unknown:
        raise RuleError(f"{source}: unknown top-level keys {sorted(unknown)}; rules go in [[rule]] tables.")
    entries = data.get("rule")
    if not isinstance(entries, list) or not entries:
        raise RuleError(f"{source}: no [[rule]] tables; add at least one with target, r and alpha.")
    rules = []
    budget = PatternBudget(source)  # one bound on the work of all the file's patterns together
    for i, entry in enumerate(entries):
        where = f"{source}: rule {i + 1}"
        if not isinstance(entry, dict):
            raise RuleError(f"{where}: expected a table, got {type(entry).__name__}.")
        extra = set(entry) - _RULE_KEYS
        if extra:
            raise RuleError(f"{where}: unknown keys {sorted(extra)}; allowed: {sorted(_RULE_KEYS)}.")
        if ("target" in entry) == ("type" in entry):
            raise RuleError(f"{where}: give exactly one of target (a name, glob or 're:regex') or type (an import path).")
        missing = [k for k in ("r", "alpha") if k not in entry]
        if missing:
            raise RuleError(f"{where}: missing {', '.join(missing)}.")
        if "target" in entry:
            target = entry["target"]
            if not isinstance(target, str):
                raise RuleError(f"{where}: target must be a string, got {type(target).__name__}.")
            if target.startswith("re:"):  # from a file: must match in bounded time
                compile_pattern(target[3:], field=f"{where}: target", error=RuleError, budget=budget)
        else:
            if not isinstance(entry["type"], str):
                raise RuleError(f"{where}: type must be a string import path such as 'torch.nn.Linear'.")
            target = _import_type(entry["type"], where)
        kwargs = {k: v for k, v in entry.items() if k not in ("target", "type")}
        try:
            rules.append(Rule(target, **kwargs))
        except RuleError as e:
            raise RuleError(f"{where}: {e}") from None
    return rules


def load_rules(path: str) -> list[Rule]:
    """Read rules from a TOML file (see :func:`rules_from_data` for the format)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise RuleError(f"cannot read rules file '{path}': {e.strerror or e}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RuleError(f"rules file '{path}' is not valid TOML: {e}.") from None
    return rules_from_data(data, source=str(path))
