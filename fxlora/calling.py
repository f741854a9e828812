"""The calling convention of a module captured with torch.export: called like the original model.

``torch.export`` gives a graph module called exactly as it was captured: for a Hugging Face decoder
captured with ``example_kwargs={"use_cache": False}``, ``ep.module()(ids)`` fails (``use_cache`` is
missing), ``ep.module()(input_ids=ids, use_cache=False)`` fails too (a positional input passed by
keyword), and an input that was not captured is a ``TypeError``.  fxlora gives the graph module it
returns (and everything made from it: the rewritten module, the folded module) the *original*
``forward`` signature instead, by installing :class:`CallingCodeGen` as the graph's code generator:

* every input is accepted positionally or by keyword, as the original ``forward`` accepts it;
* the tensors given at capture are required (``gm(ids, attention_mask=mask)`` when the mask was
  captured; their default in the signature is ``None``, and leaving them out raises
  :class:`~fxlora.errors.ArgumentError` naming them);
* a constant given at capture (``use_cache=False``) is the default, and passing another value raises
  :class:`~fxlora.errors.ArgumentError` naming it (the graph was specialised to the captured value);
* an input of the original ``forward`` that was not captured may be left out or given its default
  (``attention_mask=None``); any other value raises :class:`~fxlora.errors.ArgumentError` naming it (the
  graph does not read it), and so does a keyword the original ``forward`` takes through ``**kwargs``
  (``return_dict=False``, ``output_attentions=True``) that was not given at capture.  A name the original
  ``forward`` does not take at all is Python's ``TypeError``.

The convention lives in the graph (the code generator travels with every copy of the graph: rewrite,
fold, ``copy.deepcopy``), so no module class needs to know about it; ``inspect.signature(gm.forward)``
shows the original parameters, which is what ``transformers.Trainer`` reads to pick its inputs.
"""

from __future__ import annotations

import inspect
import keyword
import math
from typing import Any, Mapping, Sequence

import torch
from torch.fx import GraphModule
from torch.fx.graph import _custom_builtins, _PyTreeCodeGen, _register_custom_builtin
from torch.utils import _pytree as pytree

from .errors import ArgumentError

__all__ = ["NO_LITERAL", "CallingCodeGen", "convention_of", "install", "bind", "convention", "with_keyword_input"]


#: The default of an input whose original default cannot be written in the generated code (a string, so
#: that torch.fx can re-trace the generated code, as it does when it unpickles a graph module).
NO_LITERAL = "<fxlora: the original default>"

_NAME = "fxlora_calling"
_register_custom_builtin(_NAME, f"import fxlora.calling as {_NAME}", __import__(__name__, fromlist=["_"]))

_KIND = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


def _is_literal(value: Any) -> bool:
    """Whether ``repr(value)`` is Python source that evaluates back to ``value`` in generated code."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return True  # nan and inf are torch.fx builtins of generated code
    if isinstance(value, torch.dtype):
        return True  # repr "torch.float32"; torch is a builtin of generated code
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_literal(v) for k, v in value.items())
    return False


def _same(a: Any, b: Any) -> bool:
    """Whether a value passed at call time is the captured constant (or the default) ``b``."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return False


def _short(value: Any) -> str:
    """``repr(value)`` for a message: a tensor as its shape and dtype, anything else cut to 60 characters."""
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def convention_of(forward: Any, args: Sequence[Any], kwargs: Mapping[str, Any], model_name: str) -> dict[str, Any] | None:
    """The calling convention of a capture of ``forward`` (the original bound method) with ``args`` and
    ``kwargs``, as a dict of literals; None when it cannot be written as one (a captured constant that is
    not a literal, inputs captured through ``*args``), and then the capture keeps torch.export's own."""
    try:
        sig = inspect.signature(forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL and p.name in bound.arguments for p in params):
        return None
    reserved = {"self", "operator", "builtins", "math", *_custom_builtins}  # names the generated code reads
    if any(keyword.iskeyword(p.name) or p.name in reserved for p in params):
        return None
    var_kw = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    captured = {k: v for k, v in bound.arguments.items() if k != var_kw}
    captured.update(bound.arguments.get(var_kw, {}) if var_kw else {})
    inputs = [k for k, v in captured.items() if _has_tensor(v)]
    constants = {k: v for k, v in captured.items() if k not in inputs}
    if not all(_is_literal(v) for v in constants.values()):
        return None
    positional = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    signature, defaults = [], {}
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue  # nothing was captured through it; the generated forward does not take it
        signature.append((p.name, _KIND[p.kind]))
        if p.default is not inspect.Parameter.empty and _is_literal(p.default):
            defaults[p.name] = p.default
    return {
        "model": model_name,
        "signature": tuple(signature),
        "defaults": defaults,
        "args": tuple(positional[: len(args)]),
        "kwargs": tuple(kwargs),
        "inputs": tuple(inputs),
        "constants": constants,
        # kept even when nothing was captured through it, so that a keyword the model takes there
        # (return_dict=False) is an ArgumentError naming it, not Python's TypeError
        "var_keyword": var_kw,
    }


class CallingCodeGen(_PyTreeCodeGen):
    """torch.export's pytree code generator with the original ``forward`` signature (see the module
    docstring); ``convention`` is the dict :func:`convention_of` returns."""

    def __init__(self, pytree_info: Any, convention: dict[str, Any]) -> None:
        super().__init__(pytree_info)
        self.convention = convention

    def _parameters(self) -> str:
        conv = self.convention
        signature = conv["signature"]
        last_positional_only = max((i for i, (_, kind) in enumerate(signature) if kind == "positional_only"), default=-1)
        parts, star_done = [], False
        for i, (name, kind) in enumerate(signature):
            if kind == "var_keyword":
                parts.append(f"**{name}")
                continue
            if kind == "keyword_only" and not star_done:
                parts.append("*")
                star_done = True
            if name in conv["inputs"]:
                value = "None"  # required: bind() says so when it is not given
            elif name in conv["constants"]:
                value = repr(conv["constants"][name])
            elif name in conv["defaults"]:
                value = repr(conv["defaults"][name])
            else:
                value = repr(NO_LITERAL)
            parts.append(f"{name}={value}")
            if i == last_positional_only:
                parts.append("/")
        return ", ".join(parts)

    def gen_fn_def(self, free_vars: list[str], maybe_return_annotation: str, *, expanded_def: bool = False) -> str:
        conv = self.convention
        names = [name for name, kind in conv["signature"] if kind != "var_keyword"]
        values = "{" + ", ".join(f"{n!r}: {n}" for n in names)
        if conv["var_keyword"]:
            values += f", **{conv['var_keyword']}"
        values += "}"
        params = self._parameters()
        header = f"def {self._func_name}(self{', ' if params else ''}{params}){maybe_return_annotation}:"
        if not free_vars:
            return header
        targets = ", ".join(v.split(":")[0].split("#")[0] for v in free_vars)
        return (
            f"{header}\n    {targets}, = fx_pytree.tree_flatten_spec("
            f"{_NAME}.bind({conv!r}, {values}, self._in_spec), self._in_spec)"
        )


def bind(conv: Mapping[str, Any], values: dict[str, Any], in_spec: Any) -> Any:
    """The captured ``(args, kwargs)`` structure for a call given ``values`` (every parameter of the
    generated ``forward``, by name), after checking them against the convention ``conv``."""
    if any(isinstance(v, torch.fx.Proxy) for v in values.values()):
        # torch.fx re-traces the generated code (torch.fx.symbolic_trace(gm), or unpickling): keep the
        # structure, check nothing
        return _structure(conv, {**conv["constants"], **values}, in_spec)
    model = conv["model"]
    inputs, constants = conv["inputs"], conv["constants"]
    defaults = conv["defaults"]
    for name in inputs:
        value = values.get(name)
        if value is None:
            raise ArgumentError(
                f"{model} was captured with {name}=<tensor>, so its graph reads {name}: pass it "
                f"({name}=... with the same structure and dtype as at capture)."
            )
    for name, captured in constants.items():
        if name not in values:  # captured through **kwargs and not given
            values[name] = captured
            continue
        value = values[name]
        if not _same(value, captured):
            raise ArgumentError(
                f"{name}={_short(value)} differs from the value {model} was captured with ({name}={captured!r}): "
                f"torch.export specialised the graph to it. Leave {name} out, or capture again with example_kwargs="
                f"{{'{name}': ..., ...}} and rewrite that capture."
            )
    for name, value in values.items():
        if name in inputs or name in constants or (isinstance(value, str) and value == NO_LITERAL):
            continue
        default = defaults.get(name, NO_LITERAL)
        if name in defaults and _same(value, default):
            continue
        if name in defaults and default is not None:
            raise ArgumentError(
                f"{name}={_short(value)} differs from its default ({default!r}), which {model} was captured with: "
                f"torch.export specialised the graph to it. Leave {name} out, or capture again with example_kwargs="
                f"{{'{name}': ..., ...}} and rewrite that capture."
            )
        raise ArgumentError(
            f"{name} was not given when {model} was captured, so the captured graph does not read it. Leave it out, "
            f"or capture again with example_kwargs={{'{name}': ...}} (fxlora.capture / fxlora.rewrite) to use it."
        )
    return _structure(conv, values, in_spec)


def _structure(conv: Mapping[str, Any], values: dict[str, Any], in_spec: Any) -> Any:
    """``values`` in the structure the graph was captured with: ``(args, kwargs)`` or ``args``."""
    args = [values[name] for name in conv["args"]]
    kwargs = {name: values[name] for name in conv["kwargs"]}
    has_args_kwargs = (
        in_spec.type is tuple and in_spec.num_children == 2 and in_spec.child(0).type is tuple and in_spec.child(1).type is dict
    )
    return (args, kwargs) if has_args_kwargs else args


def install(gm: GraphModule, forward: Any, args: Sequence[Any], kwargs: Mapping[str, Any], model_name: str) -> bool:
    """Give ``gm`` (``ep.module()`` of a capture of ``forward`` with ``args`` and ``kwargs``) the original
    calling convention; False (and ``gm`` unchanged) when it cannot be written (see :func:`convention_of`)."""
    codegen = gm.graph._codegen
    if type(codegen) is not _PyTreeCodeGen or codegen.pytree_info is None:
        return False
    conv = convention_of(forward, args, kwargs, model_name)
    if conv is None:
        return False
    gm.graph._codegen = CallingCodeGen(codegen.pytree_info, conv)
    gm.recompile()
    return True


def convention(gm: Any) -> dict[str, Any] | None:
    """The calling convention of a graph module fxlora captured with torch.export, or None."""
    codegen = getattr(getattr(gm, "graph", None), "_codegen", None)
    return codegen.convention if isinstance(codegen, CallingCodeGen) else None


def with_keyword_input(codegen: CallingCodeGen, pytree_info: Any, name: str) -> CallingCodeGen:
    """A copy of ``codegen`` whose ``forward`` also takes the required keyword-only input ``name`` (a graph
    input a pass added, such as the ``adapter_ids`` of a served module), read through ``pytree_info``."""
    conv = dict(codegen.convention)
    signature = [entry for entry in conv["signature"] if entry[0] != name]
    at = next((i for i, (_, kind) in enumerate(signature) if kind == "var_keyword"), len(signature))
    signature.insert(at, (name, "keyword_only"))
    conv["signature"] = tuple(signature)
    conv["kwargs"] = (*[k for k in conv["kwargs"] if k != name], name)
    conv["inputs"] = (*[k for k in conv["inputs"] if k != name], name)
    conv["constants"] = {k: v for k, v in conv["constants"].items() if k != name}
    return CallingCodeGen(pytree_info, conv)
