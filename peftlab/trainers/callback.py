"""Drive the adapter lifecycle from a `transformers.Trainer`.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds,
                                   callbacks=[PeftlabCallback(model)])

Event mapping (the Trainer fires them once per optimizer step, after gradient accumulation and
clipping): on_train_begin -> prepare (no optimizer step is consumed), on_pre_optimizer_step ->
before_optimizer_step, on_optimizer_step -> after_optimizer_step (before zero_grad), on_save ->
controller state beside the checkpoint, on_log -> report(). Without this callback an AdaLoRA
model under the HF Trainer never changes rank (PEFT #1801); with it, it follows its schedule.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..adapters.inject import controller as controller_of

STATE_FILE = "peftlab_controller.pt"


class PeftlabCallback(TrainerCallback):
    """Args:
        model: the peftlab-wrapped model handed to the Trainer.
        prepare_batches: training batches given to `prepare` (EVA, SaRA), taken from the
            Trainer's own dataloader.
    """

    def __init__(self, model: nn.Module, prepare_batches: int = 16):
        self.model = model
        self.controller = controller_of(model)
        self.prepare_batches = prepare_batches
        self.skipped_steps = 0
        self._finite = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.controller.expect_total_steps(state.max_steps)
        if kwargs.get("optimizer") is not None:
            self.controller.bind_optimizer(kwargs["optimizer"])
        if state.global_step > 0:  # resuming: the Trainer already restored weights and optimizer
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {path} is missing; the checkpoint was not "
                    "written with PeftlabCallback, so the adapter's controller state cannot be restored")
            self.controller.load_state_dict(torch.load(path, weights_only=True))
            return
        loader = kwargs.get("train_dataloader")
        batches = []
        if loader is not None:
            device = next(self.model.parameters()).device
            for batch in loader:
                batches.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
                if len(batches) == self.prepare_batches:
                    break
        self.controller.prepare(self.model, batches)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._finite = all(torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None)
        if self._finite:
            self.controller.before_optimizer_step(state.global_step)
        else:  # controllers never ingest non-finite gradients
            self.skipped_steps += 1

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._finite:
            self.controller.after_optimizer_step(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path.mkdir(parents=True, exist_ok=True)
            torch.save(self.controller.state_dict(), path / STATE_FILE)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any):
        if logs is not None:
            logs.update({f"peftlab/{k}": v for k, v in self.controller.report().items()
                         if isinstance(v, (int, float)) and math.isfinite(v)})
