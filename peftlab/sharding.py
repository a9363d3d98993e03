"""Sharded training with FSDP2: the frozen base is sharded across processes, the adapter is not.

`shard` applies `torch.distributed.fsdp.fully_shard` to every transformer block, the embeddings
and the output head, then to the root, so each process stores 1/N of every base weight (4-bit ones
included: their packed bytes are stored in a float dtype, bitsandbytes' `quant_storage`, and shard
like any tensor) and gathers a unit's weights only while it runs. The trainable tensors are left out of it
(`ignored_params`) and stay whole on every process; their gradients are averaged once per backward,
as DDP does. They are well under 1% of the weights, and whole tensors are what lets every
controller (AdaLoRA's budget, IncreLoRA's growth, SaRA's threshold and re-selection, EVA's init)
make, on every process, the decision one unsharded process makes: none of them needs a collective.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .adapters.inject import adapters_of


def shard(model: nn.Module) -> nn.Module:
    """Shard a wrapped model's base across the process group (in place; returns the model).

    Call it after `peftlab.wrap` / `load_adapter` and after data-driven init (EVA's prepare), and
    build the optimizer over the trainable parameters as usual. The Trainer does all of this with
    `fsdp=True`.
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("peftlab.shard needs a process group: launch with `torchrun --nproc_per_node N` (or "
                           "`accelerate launch --multi_gpu --num_processes N`) and call "
                           "torch.distributed.init_process_group() first")
    adapters_of(model)  # a clear error if the model carries no adapters
    if is_sharded(model):
        raise ValueError("this model is already sharded")
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"cannot shard {type(model).__name__}: it names no transformer block class "
                         "(`_no_split_modules`); fsdp=true needs a transformers model")
    # the input embeddings and the output head get units of their own: inside the root's they would
    # stay gathered for the whole forward, and with large vocabularies they are a block's size or more
    # (tied ones stay in the root: a parameter belongs to one unit)
    ends = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    if len(ends) == 2 and ends[0].weight is ends[1].weight:
        ends = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # every process starts from rank 0's adapter, as DDP's constructor ensures
        for param in trainable:
            dist.broadcast(param.data, src=0)
    kept_whole = set(trainable)
    for unit in blocks + [m for m in ends if any(not p.requires_grad for p in m.parameters())]:
        fully_shard(unit, ignored_params=kept_whole, reshard_after_forward=True)
    # the root too (FSDP2 keeps the root gathered by default): it holds the embeddings and the head
    fully_shard(model, ignored_params=kept_whole, reshard_after_forward=True)
    model._peftlab_gradient_sync = GradientSync(trainable)
    adapters_of(model).sharded = True
    return model


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "_peftlab_gradient_sync")  # (a DDP wrapper has no such attribute; compile forwards it)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP wraps one by one: transformers names their classes in
    `_no_split_modules` (LlamaDecoderLayer, GPT2Block, BertLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


@contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Skip the gradient average in backward (micro-batches before the last of an accumulation)."""
    sync = getattr(model, "_peftlab_gradient_sync", None)
    if sync is None:
        yield
        return
    sync.enabled = False
    try:
        yield
    finally:
        sync.enabled = True


class GradientSync:
    """Averages the whole (unsharded) trainable tensors' gradients over processes at the end of
    each backward: one all-reduce per dtype, queued by the first gradient that lands."""

    def __init__(self, params: list[nn.Parameter]):
        self.params, self.enabled, self.queued = params, True, False
        for param in params:
            param.register_post_accumulate_grad_hook(self._queue)

    def _queue(self, _: torch.Tensor) -> None:
        if self.enabled and not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    @torch.no_grad()
    def _average(self) -> None:
        self.queued = False
        world = dist.get_world_size()
        for dtype in sorted({p.dtype for p in self.params}, key=str):  # the same order on every process
            params = [p for p in self.params if p.dtype == dtype]
            # one flag per tensor rides along: a tensor no process computed a gradient for keeps None
            flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
                             + [torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=params[0].device)])
            dist.all_reduce(flat)
            sums, present = flat[:-len(params)].split([p.numel() for p in params]), flat[-len(params):]
            for param, total, seen in zip(params, sums, present.tolist()):
                if seen:
                    param.grad = (total / world).view_as(param)
