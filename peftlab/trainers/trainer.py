"""The Accelerate trainer: one explicit loop around the adapter's lifecycle (trainers/lifecycle.py).

    start: data order, run length, prepare (or resume), optimizer
    for each optimizer step:
        forward/backward x gradient_accumulation_steps   (loss = Σ item losses / items of the whole step,
                                                          on every process; the penalty joins the last)
        clip -> before_step -> optimizer.step -> after_step -> scheduler.step

The objective (trainers/objectives.py) computes the sum of per-item losses; the step divides once
by the items (target tokens, or examples) of all its micro-batches on all processes. The run's
directory (lock, fingerprint, checkpoints, prepare cache) is trainers/checkpoint.py; metrics and
trackers trainers/metrics.py; processes trainers/distributed.py.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate.utils import set_seed
from torch import nn
from transformers import get_scheduler

from .. import kernels
from ..adapters.controller import Controller
from ..adapters.inject import active_adapter, state_of, trainable_summary
from ..data import EpochBatches, PadCollator
from ..io import refuse_overlap, save_adapter
from ..memory import return_freed_memory
from ..progress import progress, silenced
from .checkpoint import METRICS_NAME, RunDirectory, fingerprint, resumable, write_checkpoint
from .config import TrainConfig
from .distributed import accelerator_for, distribute, without_sync
from .lifecycle import Lifecycle, NonFiniteLossError, prepare_batches
from .metrics import MetricsLog
from .objectives import Preference, evaluate, objective_for

Batch = dict[str, torch.Tensor]


@dataclass
class _Loop:
    """What the training loop carries from step to step."""

    model: nn.Module                      # the model as it trains: DDP or sharded (FSDP2), maybe compiled
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total: int
    step: int
    micro: int
    batches: Iterator[Batch]
    first_step: int = 0                   # where this session started (a resumed run's checkpoint)
    tokens: list[int] = field(default_factory=lambda: [0, 0])  # this session's example tokens, and with padding
    losses: list[float] = field(default_factory=list)  # applied steps since the last log line
    started: float = field(default_factory=time.perf_counter)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def step_time(self) -> float:
        return (time.perf_counter() - self.started) / max(1, self.step - self.first_step)

    @property
    def throughput(self) -> dict[str, float]:
        """Example tokens per second, and the fraction of the batches' tokens that were padding."""
        seen, padded = self.tokens
        return {"tokens_per_second": seen / max(time.perf_counter() - self.started, 1e-9),
                "padding": 1 - seen / max(padded, 1)}


class Trainer:
    """Trains a peftlab-wrapped model with Accelerate: one process, or several (`torchrun`, `accelerate
    launch`) with DDP, or with the base sharded by FSDP2 (`fsdp=True`, see peftlab.sharding).

    Args:
        model: a model returned by `peftlab.wrap` or `peftlab.load_adapter` (continuing from an
            adapter with a fresh optimizer is exactly that: load, then train).
        config: the TrainConfig (its output_dir must be set).
        train_dataset / eval_dataset: indexable collections of feature dicts (`input_ids`,
            `attention_mask`, `labels`), e.g. a tokenized `datasets.Dataset`. Token labels train a
            causal LM (-100 = no target), one label per example a sequence classifier.
        data_collator: turns a list of features into a batch; pads dynamically by default.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_dataset: Sequence[dict[str, Any]],
                 eval_dataset: Sequence[dict[str, Any]] | None = None,
                 data_collator: Callable[[list[dict[str, Any]]], Batch] | None = None):
        state_of(model)  # a clear error if the model carries no adapters
        if config.output_dir is None:
            raise ValueError("TrainConfig.output_dir is not set: name the directory the adapter, checkpoints and "
                             "metrics go to")
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        refuse_overlap(config.output_dir, {"base model": getattr(model, "name_or_path", None)})
        return_freed_memory()  # RSS then follows the live tensors, as estimate_memory counts them
        self.model, self.config = model, config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate = data_collator or PadCollator()
        self.objective = objective_for(model, train_dataset[0], config.beta)
        self.accelerator = accelerator_for(config)
        self.lifecycle = Lifecycle(model, config.max_nonfinite_steps, say=self.accelerator.print)
        self.run_dir = RunDirectory(config.output_dir, self.accelerator)
        self.metrics = MetricsLog(Path(config.output_dir) / METRICS_NAME, self.accelerator, config.to_dict())
        self.loop: _Loop | None = None  # the running (or last) training loop

    @property
    def controller(self) -> Controller:
        return self.lifecycle.controller

    # ---------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: bool | str = False) -> dict[str, Any]:
        """Train to the configured length; `resume_from_checkpoint=True` continues from the newest
        checkpoint in output_dir (or from the given checkpoint directory) exactly where it stopped.
        Returns the final metrics: step, train_loss, eval metrics, step_time, skipped_steps."""
        fast_dropout = kernels.fast_dropout(self.model) if self.config.fast_dropout else nullcontext()
        self.run_dir.lock()
        try:
            with silenced(self.config.disable_tqdm):
                if self.config.precompute_ref_log_probs and isinstance(self.objective, Preference):
                    self.train_dataset = self.objective.with_reference(self.model, self.train_dataset, self.collate,
                                                                       self.config.eval_batch_size)
                self.loop = self._start(resume_from_checkpoint)
                # the loss head stands in after sharding, which needs the model's own output head
                with self.objective.context(self.model), fast_dropout:
                    return self._train(self.loop)
        finally:
            self.run_dir.unlock()

    def _train(self, loop: _Loop) -> dict[str, Any]:
        bar = progress(total=loop.total, initial=loop.step, desc="train", mininterval=1.0,
                       quiet=self.config.disable_tqdm or not self.accelerator.is_main_process)
        loop.model.train()
        while loop.step < loop.total:
            loss, grad_norm = self._forward_backward(loop)
            applied = self.lifecycle.before_step(loop.step, loss)  # a non-finite step drops its gradients
            loop.optimizer.step()
            self.lifecycle.after_step(loop.step, applied)
            loop.scheduler.step()
            loop.optimizer.zero_grad(set_to_none=True)
            if applied:
                loop.losses.append(loss.item())
            loop.step += 1
            bar.update(1)
            self._after_step(loop, grad_norm, bar)
        bar.close()
        return self._finish(loop)

    def _forward_backward(self, loop: _Loop) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step's micro-batches: the mean loss over every item of the step on every
        process, and the clipped gradient norm."""
        acc, objective = self.accelerator, self.objective
        batches = [next(loop.batches) for _ in range(self.config.gradient_accumulation_steps)]
        items = acc.reduce(torch.stack([objective.count(b) for b in batches]).sum().double(), "sum")
        # processes average their gradients, so each scales its sums by the process count
        scale = acc.num_processes / items.clamp_min(1).item()
        total = torch.zeros((), dtype=torch.float64, device=acc.device)
        for k, batch in enumerate(batches):
            last = k == len(batches) - 1
            with nullcontext() if last else without_sync(acc, loop.model), acc.autocast():
                summed, _ = objective.losses(loop.model, batch)
                loss = summed * scale
                # the regularizer joins the loss once per step, so clipping and the grad norm see it
                acc.backward(self.lifecycle.with_penalty(loss, loop.step) if last else loss)
            total += summed.detach().double()
            loop.micro += 1
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.config.max_grad_norm or math.inf)
        return (acc.reduce(total, "sum") / items).float(), grad_norm

    def _after_step(self, loop: _Loop, grad_norm: torch.Tensor, bar: Any) -> None:
        cfg, step = self.config, loop.step
        if step % cfg.logging_steps == 0 or step == loop.total:
            loop.metrics = {"step": step, "learning_rate": loop.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm.item(), "skipped_steps": self.lifecycle.skipped_total,
                            "step_time": loop.step_time, **loop.throughput}
            if loop.losses:  # skipped steps are counted, never averaged in as a loss
                loop.metrics["loss"] = sum(loop.losses) / len(loop.losses)
            loop.losses = []
            report = self.controller.report()
            loop.metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
            bar.set_postfix({k: f"{loop.metrics[k]:.4g}" for k in ("loss", "learning_rate") if k in loop.metrics})
            self.metrics.log(loop.metrics, report)
        if self._evaluating and cfg.eval_steps and step % cfg.eval_steps == 0 and step < loop.total:
            self.metrics.log({"step": step, **self.evaluate()})
            loop.model.train()
        if cfg.save_steps and step % cfg.save_steps == 0:
            state = {"step": step, "micro_batches": loop.micro, "world_size": self.accelerator.num_processes,
                     "config": cfg.to_dict(), "fingerprint": self.fingerprint}
            write_checkpoint(self.run_dir.path / f"checkpoint-{step}", self.model, self.lifecycle, loop.optimizer,
                             loop.scheduler, state, self.accelerator)
            self.run_dir.rotate(cfg.save_total_limit, self.fingerprint)

    @property
    def _evaluating(self) -> bool:
        return self.eval_dataset is not None and self.config.do_eval

    def _finish(self, loop: _Loop) -> dict[str, Any]:
        acc = self.accelerator
        if self.lifecycle.skipped_total == loop.total - loop.first_step:
            raise NonFiniteLossError(f"every one of the {loop.total - loop.first_step} optimizer steps had a "
                                     "non-finite loss or gradient, so nothing was trained; check the data (are all "
                                     "labels masked?)")
        final = {"step": loop.step, **({"train_loss": loop.metrics["loss"]} if "loss" in loop.metrics else {})}
        speed = {"step_time": loop.step_time, **loop.throughput}  # of the training steps, before evaluation
        if self._evaluating:
            final.update(self.evaluate())
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_adapter(self.model, self.run_dir.path, active_adapter(self.model))
            self.metrics.log(final, self.controller.report())
        acc.end_training()
        return {**final, **speed, "skipped_steps": self.lifecycle.skipped_total}

    # ------------------------------------------------------------------ set-up
    def _start(self, resume: bool | str) -> _Loop:
        """Everything before the first step: data order, run length, prepare or resume, optimizer."""
        cfg, acc = self.config, self.accelerator
        set_seed(cfg.seed)
        self.run_dir.remove_leftovers()
        lengths = [sum(len(v) for k, v in row.items() if k.endswith("input_ids")) for row in self.train_dataset] \
            if cfg.group_by_length else None
        batches = EpochBatches(len(self.train_dataset), cfg.per_device_train_batch_size,
                               acc.num_processes, acc.process_index, cfg.seed, lengths=lengths)
        total = cfg.total_steps(len(batches))
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(self.model)
        self.lifecycle.start(total)
        self.fingerprint = fingerprint(self.model, self.train_dataset)
        checkpoint = resumable(self.run_dir.path, resume, acc.process_index, acc.print)
        if checkpoint is None:
            self.run_dir.refuse_earlier_run(cfg.overwrite_output_dir)
            if self.lifecycle.needs_prepare:
                prepared = [self.objective.model_inputs(b) for b in prepare_batches(
                    self.train_dataset, self.collate, cfg.per_device_train_batch_size, acc.num_processes,
                    acc.process_index, cfg.prepare_batches, acc.device)]
                key = {k: self.fingerprint[k] for k in ("base_model", "adapter")}
                self.run_dir.prepare_cached(self.lifecycle, prepared, key)
        else:  # adapter shapes (EVA's ranks) and weights first: the optimizer is built over them
            checkpoint.check_resumable(self.fingerprint, cfg, acc.num_processes, total)
            checkpoint.restore_adapter(self.model, self.lifecycle)
        optimizer = self._optimizer()
        self.lifecycle.bind(optimizer)
        warmup = cfg.warmup(total)
        # transformers' "constant" ignores warm-up; with warm-up steps it is "constant_with_warmup"
        schedule = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" and warmup else cfg.lr_scheduler_type
        scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        step, micro = checkpoint.restore_training(optimizer, scheduler) if checkpoint else (0, 0)
        if checkpoint:
            acc.print(f"peftlab: resumed from {checkpoint.path} at step {step}")
        self.metrics.start(step)
        model = distribute(self.model, acc, cfg.fsdp)
        if cfg.torch_compile:  # fallback_random: dropout draws as in eager mode, so seeds mean the same
            model = torch.compile(model, options={"fallback_random": True})
        acc.print(trainable_summary(self.model))  # after prepare: EVA's final ranks
        loop = _Loop(model, optimizer, scheduler, total, step, micro, iter(()), step)
        loop.batches = self._micro_batches(batches, micro, loop.tokens)
        return loop

    def _micro_batches(self, batches: EpochBatches, start: int, tokens: list[int]) -> Iterator[Batch]:
        """Micro-batches from global position `start` on, across epochs, already on the device;
        `tokens` counts their examples' tokens and the tokens with padding."""
        epoch, index = divmod(start, len(batches))
        while True:
            for indices in batches.epoch(epoch, index):
                rows = [self.train_dataset[i] for i in indices]
                batch = self.collate(rows)
                tokens[0] += sum(len(v) for row in rows for k, v in row.items() if k.endswith("input_ids"))
                tokens[1] += sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))
                yield {k: v.to(self.accelerator.device) for k, v in batch.items()}
            epoch, index = epoch + 1, 0

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                      weight_decay=cfg.weight_decay)
        if cfg.optim == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        # the fused (single-kernel) AdamW, as transformers' default adamw_torch_fused: 4x faster on CPU
        return torch.optim.AdamW(params, **kwargs, fused=True)

    # -------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset: Sequence[dict[str, Any]] | None = None) -> dict[str, float]:
        """Loss, plus accuracy (classification) or perplexity (causal LM), over every process."""
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        return evaluate(self.model, data, self.collate, self.objective, self.config.eval_batch_size,
                        self.accelerator, show_progress=not self.config.disable_tqdm)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError("gradient_checkpointing=True needs a transformers model (gradient_checkpointing_enable)")
    # non-reentrant: works with frozen inputs and gives adapters their gradients (PEFT #1142)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
