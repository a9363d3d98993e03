"""How a run is spread over processes: the Accelerator for a TrainConfig, a refusal of launches that
asked for several processes but started one, and the model as it trains (DDP through Accelerate, or
FSDP2 through peftlab.shard)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn

from ..sharding import is_sharded, no_sync, shard
from .config import TrainConfig
from .metrics import trackers


def accelerator_for(config: TrainConfig) -> Accelerator:
    if config.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16=True but this GPU has no bfloat16 support; set bf16=False")
    precision = "bf16" if config.bf16 else "no"
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        # Accelerate keeps one precision per process; a second Trainer with another one must be
        # able to start (the process group, kept in PartialState, is left alone)
        AcceleratorState._reset_state()
    # cpu=True on GPU-less machines is what lets `accelerate launch --multi_gpu` (torchrun) run gloo DDP
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              log_with=trackers(config.report_to), project_dir=config.output_dir)
    check_launch(accelerator.num_processes)
    return accelerator


def check_launch(processes: int) -> None:
    """Refuse a launch that asked for several processes but got one: training alone (or as
    several independent runs) would silently differ from what was asked for."""
    requested = max(int(os.environ.get("WORLD_SIZE", "1")), _requested_by_launcher())
    if requested > 1 and processes == 1:
        raise RuntimeError(
            f"the launcher was asked for {requested} processes but this run sees one (no process group); on a "
            "machine without GPUs `accelerate launch` needs --multi_gpu to start several: use `accelerate launch "
            f"--multi_gpu --num_processes {requested} ...` or `torchrun --nproc_per_node {requested} ...`")


def _requested_by_launcher() -> int:
    """--num_processes of an `accelerate launch` that started this process (Linux), else 0."""
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 0
    if "launch" not in args or not any(Path(a).name == "accelerate" or a.endswith("accelerate_cli.py") for a in args):
        return 0
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else (
            args[i + 1] if arg == "--num_processes" and i + 1 < len(args) else None)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def distribute(model: nn.Module, accelerator: Accelerator, fsdp: bool) -> nn.Module:
    """DDP through Accelerate, or FSDP2 (peftlab.shard) when fsdp=True and there are several processes."""
    if accelerator.distributed_type == DistributedType.FSDP:  # it would shard the adapter too (see peftlab.sharding)
        raise ValueError("the accelerate config asks for FSDP; peftlab shards the base itself and keeps the adapter "
                         "whole: set distributed_type: MULTI_GPU in the accelerate config and fsdp=true here")
    if not fsdp:
        return accelerator.prepare(model)
    if accelerator.num_processes == 1:
        accelerator.print("peftlab: fsdp=true with one process: nothing to shard, training unsharded")
        return model.to(accelerator.device)
    return shard(model.to(accelerator.device))


def without_sync(accelerator: Accelerator, model: nn.Module):
    """No gradient averaging on this micro-batch (DDP's no_sync, or a sharded model's)."""
    return no_sync(model) if is_sharded(model) else accelerator.no_sync(model)
