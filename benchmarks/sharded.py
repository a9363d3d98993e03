"""Per-process memory of FSDP2 sharding: a random ~370M-parameter Llama with LoRA r=16 on every
linear layer, unsharded in one process vs sharded over two (torchrun, gloo), three training steps.

    python benchmarks/sharded.py            # both runs, one after the other, and the table

Each process reports its resident memory after loading the model (every process loads the whole
model, as from_pretrained does), after sharding, and its peak while training (the kernel's peak
counter is reset after sharding: /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
BATCH, LENGTH, STEPS = 2, 128, 3


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(shard: bool) -> dict:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftlab

    if shard:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).requires_grad_(False)
    model = peftlab.wrap(model, "lora", r=16, target_modules="all-linear", lora_dropout=0.0)
    loaded = rss_mib()
    if shard:
        peftlab.shard(model)
    sharded = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # the peak counter starts again from here
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        ids = torch.randint(0, CONFIG["vocab_size"], (BATCH * world, LENGTH), generator=gen)[rank * BATCH:(rank + 1) * BATCH]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    frozen = sum(getattr(p, "_local_tensor", p).numel() * 4 for p in model.parameters() if not p.requires_grad)
    return {"rank": rank, "params": sum(p.numel() for p in model.parameters()), "frozen_mib": frozen / 2 ** 20,
            "loaded_mib": loaded, "sharded_mib": sharded, "train_peak_mib": rss_mib("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=("one", "sharded"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "sharded")))
        return
    # the same threads per process in both runs; glibc's mmap threshold fixed, so that freed blocks go
    # back to the system and RSS follows the live tensors (by default it creeps up step after step)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    one = subprocess.run([sys.executable, __file__, "--child", "one"], env=env, capture_output=True, text=True, check=True)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two = subprocess.run([torchrun, "--nproc_per_node", "2", __file__, "--child", "sharded"], env=env,
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in one.stdout.splitlines() + two.stdout.splitlines() if line.startswith("{")]
    print(f"random Llama, {rows[0]['params'] / 1e6:.0f}M parameters (fp32), LoRA r=16 all-linear, "
          f"batch {BATCH} x {LENGTH} per process, {STEPS} steps")
    print("| run | process | frozen weights held | RSS after load | RSS after sharding | peak RSS while training |")
    print("|---|---|---|---|---|---|")
    for row, name in zip(rows, ["unsharded, 1 process", "FSDP2, 2 processes", "FSDP2, 2 processes"]):
        print(f"| {name} | {row['rank']} | {row['frozen_mib']:.0f} MiB | {row['loaded_mib']:.0f} MiB | "
              f"{row['sharded_mib']:.0f} MiB | {row['train_peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
