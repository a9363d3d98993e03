"""The Accelerate trainer: one explicit loop that calls the adapter lifecycle at fixed points.

    prepare()                                  once, before the optimizer exists
    for each optimizer step:
        forward/backward x gradient_accumulation_steps   (DDP syncs on the last micro-batch)
        clip -> before_optimizer_step -> optimizer.step -> after_optimizer_step -> scheduler.step

A step whose loss or gradient is NaN/inf is skipped whole: no hook sees it, no weight moves.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .. import quant
from ..adapters.base import Controller
from ..adapters.inject import controller as controller_of
from ..adapters.inject import state_of
from ..data import EpochBatches, PadCollator
from ..io import atomic_write, save_adapter
from .config import TrainConfig

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable_state.safetensors"


class NonFiniteLossError(RuntimeError):
    pass


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after `step` optimizer steps: linear warm-up, then decay."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)
    return factor


class Trainer:
    """Trains a peftlab-wrapped model with Accelerate (single process, or `accelerate launch`).

    Args:
        model: a model returned by `peftlab.wrap` or `peftlab.load_adapter` (continuing from an
            adapter with a fresh optimizer is exactly that: load, then train).
        config: the TrainConfig.
        train_dataset / eval_dataset: indexable collections of feature dicts (`input_ids`,
            `attention_mask`, `labels`, ...), e.g. a tokenized `datasets.Dataset`.
        data_collator: turns a list of features into a batch; pads dynamically by default.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_dataset: Sequence[dict[str, Any]],
                 eval_dataset: Sequence[dict[str, Any]] | None = None,
                 data_collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None):
        state_of(model)  # a clear error if the model carries no adapters
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.model, self.config = model, config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate = data_collator or PadCollator()
        if config.load_in_4bit and not any(quant.is_4bit(m) for m in model.modules()):
            raise ValueError("load_in_4bit=True but the model has no 4-bit layers; load it with "
                             "peftlab.quant.load_model(path, task, load_in_4bit=True) before wrapping")
        if config.bf16 and not _bf16_supported():
            raise ValueError("bf16=True but this hardware has no bfloat16 support; set bf16=False")
        precision = "bf16" if config.bf16 else "no"
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
            # Accelerate keeps one precision per process; a second Trainer with another one must be
            # able to start (the process group, kept in PartialState, is left alone)
            AcceleratorState._reset_state()
        # cpu=True on GPU-less machines is what lets `accelerate launch --multi_gpu` (torchrun) run gloo DDP
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.output_dir = Path(config.output_dir)
        self.nonfinite_steps = 0  # in a row
        self.nonfinite_total = 0
        self._tensorboard = None

    @property
    def controller(self):
        return controller_of(self.model)

    # ---------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: bool | str = False) -> dict[str, Any]:
        """Train to the configured length; `resume_from_checkpoint=True` continues from the newest
        checkpoint in output_dir (or from the given checkpoint directory) exactly where it stopped."""
        cfg, acc, model = self.config, self.accelerator, self.model
        set_seed(cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lengths = [len(row["input_ids"]) for row in self.train_dataset] if cfg.group_by_length else None
        batches = EpochBatches(len(self.train_dataset), cfg.per_device_train_batch_size,
                               acc.num_processes, acc.process_index, cfg.seed, lengths=lengths)
        total = cfg.total_steps(len(batches))
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        self.controller.expect_total_steps(total)
        checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        if checkpoint is None:
            self._prepare()
        else:  # adapter shapes (EVA's ranks) and weights first: the optimizer is built over them
            self._check_resumable(checkpoint)
            self._load_adapter_state(checkpoint)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = self._optimizer()
        self.controller.bind_optimizer(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg.lr_scheduler_type, cfg.warmup(total), total))
        step, micro = 0, 0
        if checkpoint is not None:
            step, micro = self._load_checkpoint(checkpoint, optimizer, scheduler)
        ddp_model = acc.prepare(model)
        if cfg.torch_compile:  # fallback_random: dropout draws as in eager mode, so seeds mean the same
            ddp_model = torch.compile(ddp_model, options={"fallback_random": True})
        metrics: dict[str, Any] = {}

        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0,
                   disable=cfg.disable_tqdm or not acc.is_main_process)
        micro_batches = self._micro_batches(batches, micro)
        window: list[float] = []
        start = time.perf_counter()
        ddp_model.train()
        while step < total:
            loss = torch.zeros((), device=acc.device)
            for k in range(cfg.gradient_accumulation_steps):
                batch = next(micro_batches)
                last = k == cfg.gradient_accumulation_steps - 1
                with nullcontext() if last else acc.no_sync(ddp_model):
                    micro_loss = ddp_model(**batch).loss / cfg.gradient_accumulation_steps
                    acc.backward(micro_loss)
                loss += micro_loss.detach()
                micro += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
            loss = acc.reduce(loss, "mean")
            if torch.isfinite(loss) and torch.isfinite(grad_norm):
                self.nonfinite_steps = 0
                self.controller.before_optimizer_step(step)
                optimizer.step()
                self.controller.after_optimizer_step(step)
                scheduler.step()
                window.append(loss.item())
            else:
                self._count_nonfinite(step, loss, grad_norm)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.logging_steps == 0 or step == total:
                metrics = {"step": step, "loss": sum(window) / max(len(window), 1),
                           "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                           "skipped_steps": self.nonfinite_total, "step_time": (time.perf_counter() - start) / step}
                metrics.update(_scalars(self.controller.report()))
                window = []
                bar.set_postfix(_short(metrics))
                self._log(metrics, self.controller.report())
            if self.eval_dataset is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total:
                self._log({"step": step, **self.evaluate()})
                ddp_model.train()
            if cfg.save_steps and step % cfg.save_steps == 0:
                self._save_checkpoint(step, micro, optimizer, scheduler)
        bar.close()

        final = {"step": step, **({"train_loss": metrics["loss"]} if "loss" in metrics else {})}
        if self.eval_dataset is not None:
            final.update(self.evaluate())
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_adapter(model, self.output_dir)
            self._log(final, self.controller.report())
        return final

    def _count_nonfinite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.nonfinite_steps += 1
        self.nonfinite_total += 1
        what = f"loss={loss.item()}, grad_norm={grad_norm.item()}"
        if self.nonfinite_steps >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_steps} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {step + 1}: {what}); stopping. Lower learning_rate, enable max_grad_norm, "
                "or check the data for empty or broken examples"
            )
        self.accelerator.print(f"peftlab: step {step + 1} skipped ({what}); weights and adapter state unchanged")

    def _micro_batches(self, batches: EpochBatches, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from global position `start` on, across epochs, already on the device."""
        epoch, index = divmod(start, len(batches))
        while True:
            for indices in batches.epoch(epoch, index):
                batch = self.collate([self.train_dataset[i] for i in indices])
                yield {k: v.to(self.accelerator.device) for k, v in batch.items()}
            epoch, index = epoch + 1, 0

    def _prepare(self) -> None:
        """Run the controller's prepare (EVA's PCA, ...) once; its result is cached in output_dir,
        keyed by the adapter config and the data it saw, so a restarted run does not recompute it."""
        controller = self.controller
        if type(controller).prepare is Controller.prepare:
            return
        batches = self._prepare_batches()
        digest = hashlib.sha256(json.dumps(self.model.peftlab.config.to_dict(), sort_keys=True, default=str).encode())
        for batch in batches:
            for key in sorted(batch):
                digest.update(key.encode() + batch[key].cpu().numpy().tobytes())
        cache = self.output_dir / "prepare_cache" / f"{digest.hexdigest()[:16]}_{self.accelerator.process_index}"
        if (cache / STATE_NAME).is_file():
            self.accelerator.print(f"peftlab: prepare result reused from {cache}")
            self._load_adapter_state(cache)
            return
        controller.prepare(self.model, batches)
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._save_adapter_state(tmp)
        (tmp / STATE_NAME).write_text("{}")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)

    def _save_adapter_state(self, path: Path) -> None:
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(path / TRAINABLE_NAME))  # every trainable tensor, untrimmed, for exact resume
        torch.save(self.controller.state_dict(), path / "controller.pt")

    def _load_adapter_state(self, path: Path) -> None:
        self.controller.load_state_dict(torch.load(path / "controller.pt", weights_only=True))
        self._load_trainable(path / TRAINABLE_NAME)

    def _prepare_batches(self) -> list[dict[str, torch.Tensor]]:
        """The first training batches in a fixed order, for data-driven init (EVA). Batch j covers
        the same examples whatever the process count: each process takes its slice of it, so
        statistics gathered across processes equal a single process's."""
        cfg, acc = self.config, self.accelerator
        size, world = cfg.per_device_train_batch_size, acc.num_processes
        count = min(cfg.prepare_batches, len(self.train_dataset) // (size * world))
        batches = []
        for j in range(count):
            start = (j * world + acc.process_index) * size
            batch = self.collate([self.train_dataset[i] for i in range(start, start + size)])
            batches.append({k: v.to(acc.device) for k, v in batch.items()})
        return batches

    def _optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = self.controller.param_groups(self.model, cfg.learning_rate)
        for group in groups:
            group.setdefault("weight_decay", cfg.weight_decay)
        kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        if cfg.optim == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        # the fused (single-kernel) AdamW, as transformers' default adamw_torch_fused: 4x faster on CPU
        return torch.optim.AdamW(groups, **kwargs, fused=True)

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, eval_dataset: Sequence[dict[str, Any]] | None = None) -> dict[str, float]:
        """Loss, plus accuracy (classification) or perplexity (causal LM), over every process."""
        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if data is None or len(data) == 0:
            raise ValueError("evaluate() needs a non-empty eval_dataset")
        acc, size = self.accelerator, self.config.per_device_eval_batch_size
        mine = list(range(acc.process_index, len(data), acc.num_processes))
        totals = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss sum, count, correct
        causal = False
        self.model.eval()
        for j in range(0, len(mine), size):
            batch = {k: v.to(acc.device) for k, v in self.collate([data[i] for i in mine[j:j + size]]).items()}
            labels = batch.pop("labels")
            with acc.autocast():
                logits = self.model(**batch).logits.float()
            if logits.dim() == 3:  # causal LM: predict token t+1 from tokens <= t
                causal = True
                logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
            keep = labels != -100
            totals[0] += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").double()
            totals[1] += keep.sum()
            totals[2] += (logits[keep].argmax(-1) == labels[keep]).sum()
        totals = acc.reduce(totals, "sum")
        loss = (totals[0] / totals[1]).item()
        if causal:
            return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        return {"eval_loss": loss, "eval_accuracy": (totals[2] / totals[1]).item()}

    # ------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, step: int, micro: int, optimizer, scheduler) -> None:
        """checkpoint-N/ appears complete or not at all: written to a temp dir, then renamed."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_adapter(self.model, tmp)  # the usable PEFT-format adapter (trimmed to live ranks)
            self._save_adapter_state(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": step, "micro_batches": micro, "nonfinite_steps": self.nonfinite_steps,
                     "nonfinite_total": self.nonfinite_total, "world_size": acc.num_processes,
                     "config": self.config.to_dict()}
            atomic_write(tmp / STATE_NAME, lambda p: Path(p).write_text(json.dumps(state, indent=2)))
        acc.wait_for_everyone()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._rotate_checkpoints()
        acc.wait_for_everyone()

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if limit:
            for old in checkpoints(self.output_dir)[:-limit]:
                shutil.rmtree(old)

    def _checkpoint_to_resume(self, resume: bool | str) -> Path | None:
        if not resume:
            return None
        if resume is True:
            found = checkpoints(self.output_dir)
            if not found:
                raise FileNotFoundError(
                    f"resume requested but {self.output_dir} holds no checkpoint-N directory; "
                    "train with save_steps > 0 first, or drop resume")
            return found[-1]
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a peftlab checkpoint (no {STATE_NAME})")
        return path

    def _check_resumable(self, path: Path) -> None:
        acc = self.accelerator
        state = json.loads((path / STATE_NAME).read_text())
        if state["world_size"] != acc.num_processes:
            raise ValueError(
                f"{path} was written by {state['world_size']} processes but this run has {acc.num_processes}; "
                "exact resume needs the same process count (the data order depends on it)")
        saved = {k: v for k, v in state["config"].items() if k not in ("output_dir", "disable_tqdm")}
        changed = {k: (v, getattr(self.config, k)) for k, v in saved.items() if getattr(self.config, k) != v}
        if changed:
            raise ValueError(f"{path} was written with other settings {changed} (saved, now); "
                             "resume with the same config, or start a fresh run from the adapter")

    def _load_checkpoint(self, path: Path, optimizer, scheduler) -> tuple[int, int]:
        acc = self.accelerator
        state = json.loads((path / STATE_NAME).read_text())
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / f"rng_state_{acc.process_index}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.nonfinite_steps, self.nonfinite_total = state["nonfinite_steps"], state["nonfinite_total"]
        acc.print(f"peftlab: resumed from {path} at step {state['step']}")
        return state["step"], state["micro_batches"]

    @torch.no_grad()
    def _load_trainable(self, path: Path) -> None:
        saved = load_file(str(path))
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if saved.keys() != params.keys() or any(saved[n].shape != p.shape for n, p in params.items()):
            raise ValueError(f"{path} does not fit this model's trainable parameters; resume with the same "
                             "adapter config the checkpoint was written with")
        for name, param in params.items():
            param.copy_(saved[name])

    # ----------------------------------------------------------------- logging
    def _log(self, metrics: dict[str, Any], report: dict[str, Any] | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {**metrics, **({"report": report} if report else {})}
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, metrics["step"])
            writer.flush()

    def _tensorboard_writer(self):
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._tensorboard = False
            else:
                self._tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))
        return self._tensorboard or None


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories in `output_dir`, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _scalars(report: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in report.items() if isinstance(v, (int, float))}


def _short(metrics: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['learning_rate']:.2e}"}
    if "budget" in metrics:
        shown["budget"] = str(metrics["budget"])
    return shown


def _bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast runs bfloat16 everywhere (fast with AVX512-BF16/AMX)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError("gradient_checkpointing=True needs a transformers model (gradient_checkpointing_enable)")
    # non-reentrant: works with frozen inputs and gives adapters their gradients (PEFT #1142)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
