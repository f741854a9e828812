"""Benchmark: LoRA training of a Llama-shaped ~1B model with FSDP2, fxlora against PEFT.

    # one GPU, then two, for each implementation (weak scaling: the batch per GPU is fixed)
    python  -m fxlora.tools.bench_fsdp --impl fxlora --out tools/results/fsdp-fxlora-1gpu.json
    torchrun --nproc-per-node=2 -m fxlora.tools.bench_fsdp --impl fxlora --out tools/results/fsdp-fxlora-2gpu.json
    torchrun --nproc-per-node=2 -m fxlora.tools.bench_fsdp --impl peft --out tools/results/fsdp-peft-2gpu.json

    # several nodes (every node runs the same command; MASTER is the first node's address)
    torchrun --nnodes=4 --nproc-per-node=8 --node-rank=$NODE_RANK --rdzv-backend=c10d \\
             --rdzv-endpoint=$MASTER:29500 -m fxlora.tools.bench_fsdp --impl fxlora

The model is a ``transformers.LlamaForCausalLM`` built from a config (hidden 2048, 16 layers, 32 heads,
8 key/value heads, intermediate 8192, vocabulary 32000: 1.0B parameters, random weights, bf16) with r=16
LoRA on every linear layer of every block.  fxlora captures it with torch.export and keeps each decoder
layer as a unit (``rewrite(..., units="model.layers.*")``); PEFT wraps it with ``get_peft_model``.  Both are
sharded the same way: ``fully_shard`` on each decoder layer, then on the root.  Each rank trains on its
own random tokens (AdamW on the LoRA parameters), and after the warm-up steps the script measures tokens
per second per GPU and the peak memory per GPU.  Rank 0 writes the results file.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fxlora.tools import results

import fxlora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(small: bool):
    import transformers

    if small:
        return transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=128, vocab_size=256, max_position_embeddings=512)
    return transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                    intermediate_size=8192, vocab_size=32000, max_position_embeddings=4096)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("fxlora", "peft"), default="fxlora")
    p.add_argument("--steps", type=int, default=60, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--small", action="store_true", help="a tiny model on the CPU (gloo), to check the script")
    p.add_argument("--out", metavar="FILE.json")
    a = p.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    distributed = "RANK" in os.environ
    device = torch.device("cpu")
    if distributed:
        dist.init_process_group("gloo" if a.small or not torch.cuda.is_available() else "nccl")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available() and not a.small:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda")
    dtype = torch.float32 if a.small else torch.bfloat16

    torch.manual_seed(0)
    config = _config(a.small)
    with device:
        model = transformers.LlamaForCausalLM(config).to(dtype)
    params = sum(q.numel() for q in model.parameters())
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), device=device)
    t0 = time.perf_counter()
    if a.impl == "fxlora":
        rules = [fxlora.Rule(f"model.layers.*.*.{t}", r=a.r, alpha=2 * a.r) for t in TARGETS]
        net = fxlora.rewrite(model, rules, example_inputs=(ids[:, :16].clone(),), example_kwargs={"use_cache": False},
                             units="model.layers.*")
        blocks = [net.get_submodule(u) for u in fxlora.passes.unit_paths(net)]
    else:
        import peft

        net = peft.get_peft_model(model, peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=list(TARGETS)))
        for q in net.parameters():
            if q.requires_grad:
                q.data = q.data.to(dtype)
        blocks = list(net.base_model.model.model.layers)
    prepare_s = time.perf_counter() - t0
    # fxlora's module shares the model's tensors (the model is left as it was): drop the model, so that
    # fully_shard's shards replace the full weights instead of adding to them
    del model
    trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(net, mesh=mesh, mp_policy=policy)
    net.train()
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)

    def step() -> float:
        x = torch.randint(0, config.vocab_size, (a.batch, a.seq), device=device, generator=gen)
        out = net(x, use_cache=False) if a.impl == "fxlora" else net(input_ids=x, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if distributed:
        dist.barrier()
    t0 = time.perf_counter()
    losses = [step() for _ in range(a.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens_per_s = a.batch * a.seq * a.steps / elapsed
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    stats = torch.tensor([tokens_per_s, float(peak)], dtype=torch.float64, device=device)
    if distributed:
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats)
    else:
        gathered = [stats]
    per_rank = [(float(s[0]), int(s[1])) for s in gathered]
    if rank == 0:
        mean_tps = sum(t for t, _ in per_rank) / world
        print(f"{a.impl}: {world} x {device.type}, {params / 1e9:.2f}B parameters ({trainable:,} trainable), "
              f"batch {a.batch} x {a.seq} per GPU, {a.steps} steps after {a.warmup}: "
              f"{mean_tps:,.0f} tokens/s per GPU, peak {max(m for _, m in per_rank) / 2**30:.2f} GiB per GPU; "
              f"prepare {prepare_s:.1f} s; loss {float(losses[0]):.3f} -> {float(losses[-1]):.3f}", flush=True)
        results.write(a.out, {
            "impl": a.impl, "world_size": world, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "parameters": params, "trainable": trainable, "batch_per_gpu": a.batch, "seq": a.seq, "r": a.r,
            "steps": a.steps, "warmup": a.warmup, "elapsed_s": elapsed, "prepare_s": prepare_s,
            "tokens_per_s_per_gpu": mean_tps, "per_rank": [{"tokens_per_s": t, "peak_bytes": m} for t, m in per_rank],
            "loss_first": float(losses[0]), "loss_last": float(losses[-1]),
        }, script=__file__, argv=argv)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
