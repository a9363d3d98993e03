"""Drive the adapter lifecycle (trainers/lifecycle.py) from a `transformers.Trainer`.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[PeftlabCallback()])

Event mapping (the Trainer fires them once per optimizer step, after gradient accumulation and
clipping): on_train_begin -> start, prepare (no optimizer step is consumed) and bind, or load the
lifecycle state of the checkpoint it resumes; on_pre_optimizer_step -> before_step (a non-finite
step has its gradients dropped there, so the Trainer's optimizer.step() moves nothing, exactly as
peftlab.Trainer skips it); on_optimizer_step -> after_step; on_save -> the lifecycle state in the
checkpoint; on_log -> report(). The controller's penalty joins the loss through a forward hook,
scaled so that it counts once per optimizer step whatever the Trainer does to the loss. Without
this callback an AdaLoRA model under the HF Trainer never changes rank (PEFT #1801).

transformers saves a model only through its `save_pretrained`; while the callback holds the model,
that method writes the adapter in PEFT format (as a PeftModel's does) instead of the wrapped model
under peftlab's internal names. A checkpoint also gets the trainable tensors as
`model.safetensors`, which is what transformers' own resume reads back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..io import save_adapter
from .lifecycle import CONTROLLER_FILE, Lifecycle, prepare_batches


class PeftlabCallback(TrainerCallback):
    """Args:
        model: the peftlab-wrapped model; optional, the Trainer hands it to every event.
        prepare_batches: training batches given to `prepare` (EVA), the first ones of the training
            data in its stored order, as peftlab.Trainer chooses them.
        max_nonfinite_steps: stop after this many optimizer steps in a row with a NaN/inf gradient.
    """

    def __init__(self, model: nn.Module | None = None, prepare_batches: int = 16, max_nonfinite_steps: int = 5):
        self.model = model
        self.prepare_batches, self.max_nonfinite_steps = prepare_batches, max_nonfinite_steps
        self.lifecycle: Lifecycle | None = None
        self.step = 0
        self.applied = True
        self._hook = None

    @property
    def controller(self):
        return self.lifecycle.controller

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
        say = print if state.is_world_process_zero else (lambda _: None)
        self.lifecycle = lifecycle = Lifecycle(self.model, self.max_nonfinite_steps, say)
        lifecycle.start(state.max_steps)
        self._install_penalty(args)
        if state.global_step > 0:  # resuming: the Trainer already restored weights and optimizer
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not (path / CONTROLLER_FILE).is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {path / CONTROLLER_FILE} is missing; the checkpoint was "
                    "not written with PeftlabCallback, so the adapter's lifecycle state cannot be restored")
            lifecycle.load(path)
        elif lifecycle.needs_prepare:
            loader = kwargs.get("train_dataloader")
            if loader is None:
                raise ValueError("PeftlabCallback: the Trainer gave no train_dataloader, which prepare needs")
            lifecycle.prepare(prepare_batches(loader.dataset, loader.collate_fn, args.per_device_train_batch_size,
                                              args.world_size, args.process_index, self.prepare_batches,
                                              next(self.model.parameters()).device))
        if kwargs.get("optimizer") is not None:
            lifecycle.bind(kwargs["optimizer"])

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
            normalized = kwargs.get("num_items_in_batch") is not None
            scale = 1 / (steps * (world if averaged else 1)) if normalized else 1.0
            output.loss = self.lifecycle.with_penalty(output.loss, self.step, scale)
            return output

        if self._hook is not None:
            self._hook.remove()
        self._hook = self.model.register_forward_hook(add_penalty, with_kwargs=True)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.step = state.global_step

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.applied = self.lifecycle.before_step(state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.lifecycle.after_step(state.global_step, self.applied)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            path.mkdir(parents=True, exist_ok=True)
            self.lifecycle.save(path)
            trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            save_file(trainable, str(path / "model.safetensors"), metadata={"format": "pt"})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any):
        if logs is not None and self.lifecycle is not None:
            logs.update({f"peftlab/{k}": v for k, v in self.controller.report().items()
                         if isinstance(v, (int, float)) and math.isfinite(v)})
            logs["peftlab/skipped_steps"] = self.lifecycle.skipped_total


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
