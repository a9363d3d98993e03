"""Drive the adapter lifecycle from a `transformers.Trainer`.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[PeftlabCallback()])

Event mapping (the Trainer fires them once per optimizer step, after gradient accumulation and
clipping): on_train_begin -> prepare (no optimizer step is consumed), on_pre_optimizer_step ->
before_optimizer_step, on_optimizer_step -> after_optimizer_step (before zero_grad), on_save ->
the controller state in the checkpoint, on_log -> report(). While the Trainer holds the model,
its `save_pretrained` (so `save_model()` and every checkpoint) writes the adapter in PEFT format,
not the wrapped model under peftlab's internal names; a checkpoint also gets the trainable tensors
as `model.safetensors`, which is what transformers' own resume reads back.
The controller's penalty joins the loss through a forward hook, scaled so that it counts once per
optimizer step whatever the Trainer does to the loss. Without this callback an AdaLoRA model under
the HF Trainer never changes rank (PEFT #1801); with it, it follows its schedule.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..adapters.inject import controller as controller_of
from ..io import save_adapter

STATE_FILE = "peftlab_controller.pt"


class PeftlabCallback(TrainerCallback):
    """Args:
        model: the peftlab-wrapped model; optional, the Trainer hands it to every event.
        prepare_batches: training batches given to `prepare` (EVA), taken from the Trainer's own
            dataloader.
    """

    def __init__(self, model: nn.Module | None = None, prepare_batches: int = 16):
        self.model = model
        self.prepare_batches = prepare_batches
        self.skipped_steps = 0
        self.step = 0
        self._finite = True
        self._hook = None

    @property
    def controller(self):
        return controller_of(self.model)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any):
        self.model = self.model if self.model is not None else model
        if self.model is not None:
            _save_adapter_while_wrapped(self.model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any):
        self.model = self.model if self.model is not None else model
        if self.model is None:
            raise ValueError("PeftlabCallback got no model from the Trainer; pass it: PeftlabCallback(model)")
        ctl = self.controller
        ctl.expect_total_steps(state.max_steps)
        if kwargs.get("optimizer") is not None:
            ctl.bind_optimizer(kwargs["optimizer"])
        self._install_penalty(args)
        if state.global_step > 0:  # resuming: the Trainer already restored weights and optimizer
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {path} is missing; the checkpoint was not "
                    "written with PeftlabCallback, so the adapter's controller state cannot be restored")
            ctl.load_state_dict(torch.load(path, weights_only=True))
            return
        loader = kwargs.get("train_dataloader")
        batches = []
        if loader is not None:
            device = next(self.model.parameters()).device
            for batch in loader:
                batches.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
                if len(batches) == self.prepare_batches:
                    break
        ctl.prepare(batches)

    def _install_penalty(self, args: TrainingArguments) -> None:
        """Add the controller's penalty to the model's loss in training forwards. transformers divides
        a micro-batch's loss by the accumulation steps unless the model normalized it by
        num_items_in_batch, in which case it multiplies it by the process count instead (with
        average_tokens_across_devices); the penalty is pre-scaled to come out once per step."""
        steps, world = args.gradient_accumulation_steps, args.world_size
        averaged = getattr(args, "average_tokens_across_devices", False)

        def add_penalty(module: nn.Module, inputs: tuple, kwargs: dict, output: Any) -> Any:
            if not (module.training and torch.is_grad_enabled()) or getattr(output, "loss", None) is None:
                return output
            penalty = self.controller.penalty(self.step)
            if isinstance(penalty, torch.Tensor):
                normalized = kwargs.get("num_items_in_batch") is not None
                output.loss = output.loss + penalty / (steps * (world if averaged else 1) if normalized else 1)
            return output

        if self._hook is not None:
            self._hook.remove()
        self._hook = self.model.register_forward_hook(add_penalty, with_kwargs=True)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.step = state.global_step

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
            trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(trainable, str(path / "model.safetensors"), metadata={"format": "pt"})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any):
        if logs is not None and self.model is not None:
            logs.update({f"peftlab/{k}": v for k, v in self.controller.report().items()
                         if isinstance(v, (int, float)) and math.isfinite(v)})


def _save_adapter_while_wrapped(model: nn.Module) -> None:
    """The model's save_pretrained writes its adapter (as a PeftModel's does) while it is wrapped,
    and the model's own method again after unwrap/merge. transformers' resume loads
    model.safetensors non-strictly; the frozen names are declared ignorable so it does not list
    every base weight as missing."""
    if "save_pretrained" in vars(model):
        return

    def save_pretrained(save_directory, *args: Any, is_main_process: bool = True, **kwargs: Any) -> None:
        if not hasattr(model, "peftlab"):
            return type(model).save_pretrained(model, save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            save_adapter(model, save_directory)

    model.save_pretrained = save_pretrained
    model._keys_to_ignore_on_save = [n for n, p in model.named_parameters() if not p.requires_grad]
