"""Batches for training: a padding collator and a deterministic, resumable batch order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch


@dataclass
class PadCollator:
    """Pads `input_ids`-style features to the longest sequence in the batch (dynamic padding).

    `labels` that are sequences (causal LM) are padded with -100 so the loss ignores them;
    scalar labels (classification) are stacked.
    """

    pad_token_id: int = 0
    label_pad_id: int = -100

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [torch.as_tensor(f[key]) for f in features]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
                continue
            pad = self.label_pad_id if key == "labels" else (self.pad_token_id if key == "input_ids" else 0)
            longest = max(v.shape[0] for v in values)
            out = torch.full((len(values), longest), pad, dtype=values[0].dtype)
            for i, v in enumerate(values):
                out[i, : v.shape[0]] = v
            batch[key] = out
        return batch


class EpochBatches:
    """Which examples form micro-batch `i` of `epoch` on process `rank`: a pure function of
    (seed, epoch, i), so a resumed run picks up exactly where the interrupted one stopped.

    Each global batch (per_device * world size examples) is split evenly across processes, so a
    2-process run sees the same examples per optimizer step as a 1-process run with the same
    global batch. The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, num_examples: int, per_device: int, world_size: int, rank: int, seed: int, shuffle: bool = True):
        if num_examples < per_device * world_size:
            raise ValueError(
                f"the training set has {num_examples} examples, fewer than one global batch "
                f"({per_device} per device x {world_size} processes); lower per_device_train_batch_size"
            )
        self.num_examples, self.per_device, self.world_size, self.rank = num_examples, per_device, world_size, rank
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return self.num_examples // (self.per_device * self.world_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """Micro-batches of `epoch` from index `start` on."""
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.num_examples))
        global_batch = self.per_device * self.world_size
        for i in range(start, len(self)):
            chunk = order[i * global_batch: (i + 1) * global_batch]
            yield chunk[self.rank * self.per_device: (self.rank + 1) * self.per_device]
