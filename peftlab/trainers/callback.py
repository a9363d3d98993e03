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
under peftlab's internal names. transformers' own resume reads `model.safetensors`: a checkpoint's
holds only the trainable tensors the adapter file does not hold verbatim (none for LoRA, AdaLoRA's
ranks pruned from its file), and the callback restores the rest from the adapter file, so no
checkpoint holds the adapter twice.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..adapters.inject import active_adapter
from ..io import WEIGHTS_NAME, parameters_in_adapter_file, save_adapter
from .lifecycle import CONTROLLER_FILE, Lifecycle, prepare_batches


class PeftlabCallback(TrainerCallback):
    """Args:
        model: the peftlab-wrapped model; optional, the Trainer hands it to every event.
        prepare_batches: training batches given to `prepare` (EVA), the first ones of the training
            data in its stored order, as peftlab.Trainer chooses them.
        max_nonfinite_steps: stop after this many optimizer steps in a row with a NaN/inf gradient.
        allow_reference_model: let a TRL preference trainer (DPO, KTO) hold a reference model of its
            own; by default that is refused, because TRL cannot disable a peftlab adapter and would
            load a second copy of the base for it (README, "Preference tuning").
    """

    def __init__(self, model: nn.Module | None = None, prepare_batches: int = 16, max_nonfinite_steps: int = 5,
                 allow_reference_model: bool = False):
        self.model = model
        self.prepare_batches, self.max_nonfinite_steps = prepare_batches, max_nonfinite_steps
        self.allow_reference_model = allow_reference_model
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
        # TRL builds its reference model after this event, so the refusal comes before the memory is spent
        if getattr(args, "precompute_ref_log_probs", True) is False and not self.allow_reference_model:
            raise ValueError(
                f"{type(args).__name__}: TRL disables adapters only of PEFT's own PeftModel, so for a peftlab model "
                "it would load a second copy of the base as the reference. Set precompute_ref_log_probs=True (the "
                "reference log-probs are then computed once before training, by the wrapped model, which equals "
                "its base at that point), or train with peftlab's DPO (peftlab train ... task=dpo), whose "
                "reference is the same model with its adapter disabled. Passing a ref_model of your own on purpose? "
                "PeftlabCallback(allow_reference_model=True)")

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
            _restore_from_adapter_file(self.model, path)
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
            in_adapter = parameters_in_adapter_file(self.model)
            rest = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters()
                    if p.requires_grad and n not in in_adapter}
            save_file(rest, str(path / "model.safetensors"), metadata={"format": "pt"})
            # what transformers' resume will not find there, so that it reports nothing as missing
            self.model._keys_to_ignore_on_save = [n for n, _ in self.model.named_parameters() if n not in rest]

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
            save_adapter(model, save_directory, active_adapter(model))

    model.save_pretrained = save_pretrained
    in_adapter = parameters_in_adapter_file(model)
    model._keys_to_ignore_on_save = [n for n, p in model.named_parameters() if not p.requires_grad or n in in_adapter]


@torch.no_grad()
def _restore_from_adapter_file(model: nn.Module, checkpoint: Path) -> None:
    """The trainable tensors a checkpoint keeps only in its adapter file (transformers read the rest)."""
    tensors = load_file(str(checkpoint / WEIGHTS_NAME))
    parameters = dict(model.named_parameters())
    for name, key in parameters_in_adapter_file(model).items():
        parameters[name].copy_(tensors[key])
