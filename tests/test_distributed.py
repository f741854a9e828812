"""A rewritten module under DistributedDataParallel and FSDP2 (two CPU processes, gloo).

Each engine trains five SGD steps on a global batch split over the two ranks; single-process training on
the whole batch must give the same losses and LoRA tensors, step for step.  FSDP2 shards per block
(``rewrite(..., units=...)`` keeps the blocks as modules whose forward runs) and then the root; the
state-dict functions, ``save_lora`` (rank 0 writes), ``load_lora`` (each rank takes its shard) and
``fold`` (gathered, whole) work on the sharded module directly.  Under DDP only the LoRA parameters are
in the reducer's buckets.
"""

from __future__ import annotations

import os
import socket
import time

import fxlora
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from fxlora import zoo

RULES = [fxlora.Rule("transformer.h.*.attn.c_attn", r=4, alpha=8, enable_lora=[True, False, True]),
         fxlora.Rule("transformer.h.*.mlp.c_fc", r=2, alpha=4)]
UNITS = "transformer.h.*"
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(100))


def _model(units=None):
    torch.manual_seed(0)  # the same base model and LoRA init everywhere
    gm = fxlora.rewrite(zoo.gpt2_tiny().eval(), RULES, units=units)  # eval: no dropout, so ranks agree
    with torch.no_grad():  # non-zero B, so the first step already moves A
        for name in fxlora.lora_parameter_names(gm):
            if name.endswith("lora_B"):
                gm.get_parameter(name).normal_(0, 0.02)
    return gm


def _loss(model, x):
    return F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def _train(model, x, reduce=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(STEPS):
        loss = _loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(reduce(loss.detach()) if reduce else loss.item())
    return losses


def _worker(rank: int, world: int, port: int, engine: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = _batch()
        local = x.chunk(world)[rank]
        result = {}
        if engine == "ddp":
            gm = _model()
            model = torch.nn.parallel.DistributedDataParallel(gm)
            data = model._get_ddp_logging_data()
            lora = [gm.get_parameter(n) for n in fxlora.lora_parameter_names(gm)]
            result["reducer"] = (data["num_parameter_tensors"], data["total_parameter_size_bytes"])
            result["lora_sizes"] = (len(lora), sum(p.numel() * p.element_size() for p in lora))
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            gm = _model(units=UNITS)
            mesh = init_device_mesh("cpu", (world,))  # CPU even where CUDA exists
            for unit in fxlora.passes.unit_paths(gm):  # the block is the unit gathered before its forward
                fully_shard(gm.get_submodule(unit), mesh=mesh)
            model = fully_shard(gm, mesh=mesh)
            from torch.distributed.tensor import DTensor

            result["sharded"] = isinstance(gm.get_parameter("transformer.h.0.attn.c_attn.lora_A"), DTensor)

        def mean(t):
            dist.all_reduce(t)
            return float(t) / world

        result["losses"] = _train(model, local, reduce=mean)
        result["lora"] = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}  # gathered on every rank
        fxlora.save_lora(gm, f"{out}.safetensors")  # every rank gathers, rank 0 writes
        dist.barrier()
        with torch.no_grad():  # load it back into the (sharded) module: each rank takes its shard
            for name in fxlora.lora_parameter_names(gm):
                gm.get_parameter(name).zero_()
        fxlora.load_lora(gm, f"{out}.safetensors")
        result["reloaded"] = {k: v.clone() for k, v in fxlora.lora_state_dict(gm).items()}
        folded = fxlora.fold(gm)  # gathered: the whole folded model on every rank
        with torch.no_grad():
            result["folded"] = folded(x)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference():
    """Single-process training on the whole global batch."""
    gm = _model()
    x = _batch()
    losses = _train(gm, x)
    with torch.no_grad():
        folded = fxlora.fold(gm)(x)
    return {"losses": losses, "lora": fxlora.lora_state_dict(gm), "folded": folded}


@pytest.mark.parametrize("engine", ["ddp", "fsdp_per_block"])
def test_two_processes_train_as_one_on_the_same_global_batch(engine, reference, tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), engine, out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{i}", weights_only=False) for i in range(2)]
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), atol=1e-5, rtol=1e-5)
        assert set(r["lora"]) == set(reference["lora"])
        for k, v in reference["lora"].items():
            torch.testing.assert_close(r["lora"][k], v, atol=1e-5, rtol=1e-4)
            assert torch.equal(r["reloaded"][k], r["lora"][k])
        torch.testing.assert_close(r["folded"], reference["folded"], atol=1e-4, rtol=1e-4)
    assert reference["losses"][-1] < reference["losses"][0]
    if engine == "ddp":  # only the LoRA parameters are in the reducer's buckets: the frozen base costs no traffic
        assert results[0]["reducer"] == results[0]["lora_sizes"]
    else:
        assert results[0]["sharded"]
    written = fxlora.lora_state_dict(_model())
    fxlora.load_lora(fresh := _model(), f"{out}.safetensors")
    assert set(fxlora.lora_state_dict(fresh)) == set(written)
    for k, v in reference["lora"].items():
        torch.testing.assert_close(fxlora.lora_state_dict(fresh)[k], v, atol=1e-5, rtol=1e-4)


def _misuse_worker(rank: int, world: int, port: int, out: str) -> None:
    """A save called on rank 1 only, then the ranks gathering in different orders: each a CheckpointError
    on the ranks that called, with no file written, instead of a hang."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fxlora.distributed.ARRIVAL_TIMEOUT_S = 1.0
    gm = _model(units=UNITS)
    mesh = init_device_mesh("cpu", (world,))
    for unit in fxlora.passes.unit_paths(gm):
        fully_shard(gm.get_submodule(unit), mesh=mesh)
    fully_shard(gm, mesh=mesh)
    result = {}
    try:
        if rank == 1:  # the others never come
            fxlora.save_lora(gm, f"{out}.safetensors")
    except fxlora.CheckpointError as e:
        result["alone"] = str(e)
    # rank 1 left an unmatched collective in the group, so no barrier (it would pair with it): rank 0
    # waits for rank 1's result file, and both leave without tearing the group down
    if rank == 0:
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{out}.1") and time.monotonic() < deadline:
            time.sleep(0.05)
    result["file"] = os.path.exists(f"{out}.safetensors")
    torch.save(result, f"{out}.{rank}.tmp")
    os.replace(f"{out}.{rank}.tmp", f"{out}.{rank}")
    os._exit(0)


def test_a_save_on_one_rank_of_a_sharded_module_is_refused_not_hung(tmp_path):
    out = str(tmp_path / "misuse")
    mp.spawn(_misuse_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{i}", weights_only=False) for i in range(2)]
    assert "alone" not in results[0]
    assert "every rank must call them" in results[1]["alone"] and "Nothing was written" in results[1]["alone"]
    assert not results[0]["file"] and not results[1]["file"]
