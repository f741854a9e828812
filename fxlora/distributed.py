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

import time
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import CheckpointError

__all__ = ["ARRIVAL_TIMEOUT_S", "is_sharded", "full", "copy_into", "is_writer", "rank", "world_size", "plain_class", "local_empty_like"]


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


ARRIVAL_TIMEOUT_S = 600.0
"""How long :func:`full` waits for the other ranks of a sharded tensor's mesh to make the same call
before it raises :class:`CheckpointError` (instead of waiting in the gather for torch.distributed's
own timeout, or for ever)."""


def _arrive(t: torch.Tensor) -> None:
    """Check that every rank of ``t``'s mesh gathers a tensor of ``t``'s shape now: one small all-reduce,
    polled until ``ARRIVAL_TIMEOUT_S``.  A rank whose peers do not come (a save called on one rank
    only) or come for another tensor (calls in another order) gets a CheckpointError."""
    mesh = t.device_mesh
    tag = float(zlib.crc32(f"{tuple(t.shape)} {t.dtype}".encode()) % (1 << 23))  # the same on every rank
    flags = torch.tensor([tag, -tag], dtype=torch.float32, device=t.to_local().device)
    for dim in range(mesh.ndim):  # the mesh's own groups: ranks outside it never take part
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=mesh.get_group(dim), async_op=True)
        deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise CheckpointError(
                    f"rank {rank()} waited {ARRIVAL_TIMEOUT_S:g} s for the other ranks to gather a sharded tensor: "
                    "lora_state_dict, save_lora, save_peft_adapter and fold gather the shards of a sharded module, "
                    "so every rank must call them, in the same order (rank 0 writes the file). Nothing was written; "
                    "this process group cannot be used for collectives any more."
                )
            time.sleep(1e-4)
        work.wait()
    if flags.tolist() != [tag, -tag]:
        raise CheckpointError(
            f"rank {rank()} gathered a sharded tensor of shape {tuple(t.shape)} while another rank gathered "
            "another one: every rank must call lora_state_dict, save_lora, save_peft_adapter and fold on the "
            "same module, in the same order. Nothing was written."
        )


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or, for a ``DTensor``, the full tensor gathered from every rank (a collective, after
    :func:`_arrive` has checked that every rank is making it)."""
    if not is_sharded(t):
        return t
    _arrive(t)
    return t.full_tensor()


def local_empty_like(target: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``target``'s *global* shape and dtype, on the device of its local shard."""
    if is_sharded(target):
        return torch.empty(target.shape, dtype=target.dtype, device=target.to_local().device)
    return torch.empty_like(target.detach(), memory_format=torch.preserve_format)


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full tensor ``value`` into ``target``: for a ``DTensor``, this rank's shard of it."""
    if is_sharded(target):
        from torch.distributed.tensor import distribute_tensor

        # every rank read the same full tensor: each cuts its own shard, no communication (src_data_rank=None)
        shard = distribute_tensor(
            value.to(target.to_local().device), target.device_mesh, target.placements, src_data_rank=None
        )
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
