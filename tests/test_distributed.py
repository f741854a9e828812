"""Training a rewritten module under DistributedDataParallel and FSDP (two CPU processes, gloo)."""

from __future__ import annotations

import os
import socket

import fxlora
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from fxlora import zoo

RULES = [fxlora.Rule("transformer.h.*.attn.c_attn", r=4, alpha=8, enable_lora=[True, False, True])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, engine: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same base model and LoRA init on every rank
        gm = fxlora.rewrite(zoo.gpt2_tiny(), RULES)
        if engine == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(gm)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(gm, mesh=init_device_mesh("cpu", (world,)))  # CPU even where CUDA exists
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        x = torch.randint(0, 256, (4, 16), generator=g)
        losses = []
        for _ in range(5):
            loss = F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if engine == "fsdp":
            from torch.distributed.tensor import DTensor

            state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in gm.state_dict().items()}
            lora = {k: state[k] for k in fxlora.lora_parameter_names(gm)}
        else:
            lora = fxlora.lora_state_dict(gm)
        torch.save({"lora": {k: v.detach().clone() for k, v in lora.items()}, "losses": losses}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_process_training_keeps_lora_in_sync(engine, tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), engine, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{i}", weights_only=True) for i in range(2))
    assert set(r0["lora"]) == set(fxlora.lora_parameter_names(fxlora.rewrite(zoo.gpt2_tiny(), RULES)))
    for k in r0["lora"]:
        torch.testing.assert_close(r0["lora"][k], r1["lora"][k], atol=1e-6, rtol=0)
    assert any(bool(v.abs().sum() > 0) for k, v in r0["lora"].items() if k.endswith("lora_B"))  # it trained
    assert r0["losses"][-1] < r0["losses"][0]
