"""Pickling refusals shared by fxlora's graph modules (:class:`fxlora.LoraGraphModule` and the plain
module :func:`fxlora.fold` returns): a module that holds a function defined inside another function
(torch.export's input guards, a hook defined in a function) is refused with a
:class:`~fxlora.errors.CheckpointError` saying what to do instead, before pickle would fail on it with a
bare ``AttributeError``."""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule

from .errors import CheckpointError

__all__ = ["refuse_unpicklable_modules", "reduce_folded"]


def _local_function(attr: str, value: Any) -> str | None:
    """The name of a function defined inside another (pickle cannot save one) that the module attribute
    ``attr`` is or, for a dict of hooks, holds; or None."""
    for item in value.values() if isinstance(value, dict) and "hook" in attr else (value,):
        qualname = getattr(item, "__qualname__", "")
        if callable(item) and isinstance(qualname, str) and "<locals>" in qualname:
            return qualname
    return None


def refuse_unpicklable_modules(gm: GraphModule, *, folded: bool = False) -> None:
    """A :class:`CheckpointError` saying what to do instead, before pickle fails on a generated function
    (torch.export's input guards, a hook defined in a function) with a bare ``AttributeError``."""
    for name, module in gm.named_modules():
        for attr, value in vars(module).items():
            if _local_function(attr, value) is None:
                continue
            guards = type(module).__name__ == "GuardsFn" or name.rpartition(".")[2] == "_guards_fn"
            what = (
                "a function generated when the model was captured (torch.export's input guards)"
                if guards
                else f"a function defined inside another function ({_local_function(attr, value)})"
            )
            instead = (
                "Save the folded model with fxlora.export.to_exported_program (or keep the adapter with "
                "fxlora.save_lora and fold again after loading)"
                if folded
                else "Save the adapter with fxlora.save_lora and rewrite the model again to restore it, or save "
                "the folded model with fxlora.export.to_exported_program"
            )
            raise CheckpointError(
                f"this {'folded ' if folded else ''}module cannot be pickled: its submodule '{name}' "
                f"({type(module).__name__}) holds '{attr}', {what}. {instead}; copy.deepcopy works."
            )


def reduce_folded(gm: GraphModule) -> tuple[Any, ...]:
    """``GraphModule.__reduce__`` for the plain graph modules :func:`fxlora.fold` returns, refusing one of
    a ``torch.export`` capture with the :class:`CheckpointError` that says what to do instead (pickle
    would fail on a generated function with a bare ``AttributeError``)."""
    refuse_unpicklable_modules(gm, folded=True)
    return GraphModule.__reduce__(gm)
