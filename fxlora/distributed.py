"""fxlora on sharded modules: DDP, FSDP2 (``fully_shard``), several processes.

Under FSDP2 a module's parameters are ``DTensor`` shards.  The state-dict functions, the checkpoint
writers and :func:`fxlora.fold` gather what they need with :func:`full` (a collective: every rank must
make the same calls in the same order, as with ``torch.distributed`` itself), so

* ``lora_state_dict(gm)`` returns full tensors on every rank;
* ``save_lora`` / ``save_peft_adapter`` gather on every rank and write on rank 0 only (call them on
  every rank; :func:`is_writer`);
* ``load_lora`` / ``load_lora_state_dict`` read the full tensors on every rank and copy each rank's
  shard into its local parameter (:func:`copy_into`);
* ``fold`` gathers and returns the same full, unsharded module on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_sharded", "full", "copy_into", "is_writer", "rank", "world_size", "plain_class", "local_empty_like"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a sharded or replicated parameter under FSDP2 / tensor parallel)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or, for a ``DTensor``, the full tensor gathered from every rank (a collective)."""
    return t.full_tensor() if is_sharded(t) else t


def local_empty_like(target: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``target``'s *global* shape and dtype, on the device of its local shard."""
    if is_sharded(target):
        return torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
    return torch.empty_like(target.detach(), memory_format=torch.preserve_format)


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full tensor ``value`` into ``target``: for a ``DTensor``, this rank's shard of it."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(value.to(target.to_local().device), target.device_mesh, target.placements)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(value)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return rank() == 0


def plain_class(module: nn.Module) -> type:
    """``module``'s class without FSDP2's wrapper class (``fully_shard`` makes ``FSDPLinear(FSDPModule,
    Linear)``), for copies that must not carry FSDP's behaviour."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return cls
    if issubclass(cls, FSDPModule):
        bases = [b for b in cls.__bases__ if not issubclass(b, FSDPModule)]
        if bases:
            return bases[0]
    return cls
