"""The Accelerate trainer: one explicit loop that calls the adapter lifecycle at fixed points.

    prepare()                                  once, before the optimizer exists
    for each optimizer step:
        forward/backward x gradient_accumulation_steps   (gradients average over processes on the last micro-batch;
                                                          the controller's penalty joins its loss)
        clip -> before_optimizer_step -> optimizer.step -> after_optimizer_step -> scheduler.step

A step whose loss or gradient is NaN/inf is skipped whole: no hook sees it, no weight moves.
Learning-rate schedules are transformers' (`get_scheduler`), metrics go to `metrics.jsonl` and to
Accelerate's trackers (`report_to`). Checkpoints are written here rather than with Accelerate's
`save_state`, which would store the whole base model and reads its RNG state back with pickle:
ours hold only trainable tensors (safetensors) and tensor-only torch files loaded with
`weights_only=True`, and appear complete or not at all (temp directory, then rename).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_scheduler

from ..adapters.base import Controller
from ..adapters.inject import controller as controller_of
from ..adapters.inject import state_of
from ..data import EpochBatches, PadCollator
from ..io import atomic_write, save_adapter
from ..progress import progress
from ..sharding import is_sharded, no_sync, shard
from .config import TrainConfig

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable_state.safetensors"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".peftlab.lock"

Batch = dict[str, torch.Tensor]


class NonFiniteLossError(RuntimeError):
    pass


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
    losses: list[float] = field(default_factory=list)  # applied steps since the last log line
    started: float = field(default_factory=time.perf_counter)
    metrics: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains a peftlab-wrapped model with Accelerate: one process, or several (`torchrun`, `accelerate
    launch`) with DDP, or with the base sharded by FSDP2 (`fsdp=True`, see peftlab.sharding).

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
                 data_collator: Callable[[list[dict[str, Any]]], Batch] | None = None):
        state_of(model)  # a clear error if the model carries no adapters
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.model, self.config = model, config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate = data_collator or PadCollator()
        if config.bf16 and not _bf16_supported():
            raise ValueError("bf16=True but this hardware has no bfloat16 support; set bf16=False")
        precision = "bf16" if config.bf16 else "no"
        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
            # Accelerate keeps one precision per process; a second Trainer with another one must be
            # able to start (the process group, kept in PartialState, is left alone)
            AcceleratorState._reset_state()
        # cpu=True on GPU-less machines is what lets `accelerate launch --multi_gpu` (torchrun) run gloo DDP
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                                       log_with=_trackers(config.report_to), project_dir=config.output_dir)
        _check_launch(self.accelerator.num_processes)
        self.output_dir = Path(config.output_dir)
        self.nonfinite_steps = 0  # in a row
        self.nonfinite_total = 0
        self.loop: _Loop | None = None  # the running (or last) training loop

    @property
    def controller(self) -> Controller:
        return controller_of(self.model)

    # ---------------------------------------------------------------- training
    def train(self, resume_from_checkpoint: bool | str = False) -> dict[str, Any]:
        """Train to the configured length; `resume_from_checkpoint=True` continues from the newest
        checkpoint in output_dir (or from the given checkpoint directory) exactly where it stopped."""
        self._lock()
        try:
            return self._train(resume_from_checkpoint)
        finally:
            self._unlock()

    def _train(self, resume_from_checkpoint: bool | str) -> dict[str, Any]:
        cfg, ctl = self.config, self.controller
        self.loop = loop = self._start(resume_from_checkpoint)
        bar = progress(total=loop.total, initial=loop.step, desc="train", mininterval=1.0,
                       quiet=cfg.disable_tqdm or not self.accelerator.is_main_process)
        loop.model.train()
        while loop.step < loop.total:
            loss, grad_norm = self._forward_backward(loop)
            if self._finite(loss, grad_norm, loop.step):
                ctl.before_optimizer_step(loop.step)
                loop.optimizer.step()
                ctl.after_optimizer_step(loop.step)
                loop.scheduler.step()
                loop.losses.append(loss.item())
            loop.optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            bar.update(1)
            self._after_step(loop, grad_norm, bar)
        bar.close()
        return self._finish(loop)

    def _forward_backward(self, loop: _Loop) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step's micro-batches: the mean loss over processes and the clipped gradient norm."""
        acc, steps = self.accelerator, self.config.gradient_accumulation_steps
        loss = torch.zeros((), device=acc.device)
        for k in range(steps):
            last = k == steps - 1
            with nullcontext() if last else _no_sync(acc, loop.model), acc.autocast():
                micro_loss = loop.model(**next(loop.batches)).loss / steps
                # the regularizer joins the loss once per step, so clipping and the grad norm see it
                acc.backward(micro_loss + self.controller.penalty(loop.step) if last else micro_loss)
            loss += micro_loss.detach()
            loop.micro += 1
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.config.max_grad_norm or math.inf)
        return acc.reduce(loss, "mean"), grad_norm

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            self.nonfinite_steps = 0
            return True
        self.nonfinite_steps += 1
        self.nonfinite_total += 1
        what = f"loss={loss.item()}, grad_norm={grad_norm.item()}"
        if self.nonfinite_steps >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_steps} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {step + 1}: {what}); stopping. Lower learning_rate, enable max_grad_norm, "
                "or check the data for empty or broken examples")
        self.accelerator.print(f"peftlab: step {step + 1} skipped ({what}); weights and adapter state unchanged")
        return False

    def _after_step(self, loop: _Loop, grad_norm: torch.Tensor, bar: Any) -> None:
        cfg, step = self.config, loop.step
        if step % cfg.logging_steps == 0 or step == loop.total:
            loop.metrics = {"step": step, "learning_rate": loop.scheduler.get_last_lr()[0],
                            "grad_norm": grad_norm.item(), "skipped_steps": self.nonfinite_total,
                            "step_time": (time.perf_counter() - loop.started) / step}
            if loop.losses:  # skipped steps are counted, never averaged in as a loss
                loop.metrics["loss"] = sum(loop.losses) / len(loop.losses)
            loop.losses = []
            report = self.controller.report()
            loop.metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
            bar.set_postfix({k: f"{loop.metrics[k]:.4g}" for k in ("loss", "learning_rate") if k in loop.metrics})
            self._log(loop.metrics, report)
        if self.eval_dataset is not None and cfg.eval_steps and step % cfg.eval_steps == 0 and step < loop.total:
            self._log({"step": step, **self.evaluate()})
            loop.model.train()
        if cfg.save_steps and step % cfg.save_steps == 0:
            self._save_checkpoint(loop)

    def _finish(self, loop: _Loop) -> dict[str, Any]:
        acc = self.accelerator
        if self.nonfinite_total == loop.total:
            raise NonFiniteLossError(f"every one of the {loop.total} optimizer steps had a non-finite loss or "
                                     "gradient, so nothing was trained; check the data (are all labels masked?)")
        final = {"step": loop.step, **({"train_loss": loop.metrics["loss"]} if "loss" in loop.metrics else {})}
        if self.eval_dataset is not None:
            final.update(self.evaluate())
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_adapter(self.model, self.output_dir)
            self._log(final, self.controller.report())
        acc.end_training()
        return final

    # ------------------------------------------------------------------ set-up
    def _start(self, resume: bool | str) -> _Loop:
        """Everything before the first step: data order, run length, prepare or resume, optimizer."""
        cfg, acc = self.config, self.accelerator
        set_seed(cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:  # a checkpoint a crash left half-written is never resumed from
            for leftover in self.output_dir.glob(".checkpoint-*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
        lengths = [len(row["input_ids"]) for row in self.train_dataset] if cfg.group_by_length else None
        batches = EpochBatches(len(self.train_dataset), cfg.per_device_train_batch_size,
                               acc.num_processes, acc.process_index, cfg.seed, lengths=lengths)
        total = cfg.total_steps(len(batches))
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(self.model)
        self.controller.expect_total_steps(total)
        self.fingerprint = self._fingerprint()
        checkpoint = self._checkpoint_to_resume(resume)
        if checkpoint is None:
            self._clear_earlier_run()
            self._prepare()
        else:  # adapter shapes (EVA's ranks) and weights first: the optimizer is built over them
            self._check_resumable(checkpoint)
            self._load_adapter_state(checkpoint)
        optimizer = self._optimizer()
        self.controller.bind_optimizer(optimizer)
        scheduler = get_scheduler(_schedule_name(cfg.lr_scheduler_type, cfg.warmup(total)), optimizer,
                                  num_warmup_steps=cfg.warmup(total), num_training_steps=total)
        step, micro = self._load_checkpoint(checkpoint, optimizer, scheduler) if checkpoint else (0, 0)
        self._start_metrics(step)
        acc.init_trackers("peftlab", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})
        model = self._distribute()
        if cfg.torch_compile:  # fallback_random: dropout draws as in eager mode, so seeds mean the same
            model = torch.compile(model, options={"fallback_random": True})
        return _Loop(model, optimizer, scheduler, total, step, micro, self._micro_batches(batches, micro))

    def _distribute(self) -> nn.Module:
        """DDP through Accelerate, or FSDP2 (peftlab.shard) when fsdp=True and there are several processes."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP:  # it would shard the adapter too (see peftlab.sharding)
            raise ValueError("the accelerate config asks for FSDP; peftlab shards the base itself and keeps the adapter "
                             "whole: set distributed_type: MULTI_GPU in the accelerate config and fsdp=true here")
        if not self.config.fsdp:
            return acc.prepare(self.model)
        if acc.num_processes == 1:
            acc.print("peftlab: fsdp=true with one process: nothing to shard, training unsharded")
            return self.model.to(acc.device)
        return shard(self.model.to(acc.device))

    def _micro_batches(self, batches: EpochBatches, start: int) -> Iterator[Batch]:
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
        controller.prepare(batches)
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._save_adapter_state(tmp)
        (tmp / STATE_NAME).write_text("{}")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)

    def _prepare_batches(self) -> list[Batch]:
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
        return evaluate(self.model, data, self.collate, self.accelerator, self.config.per_device_eval_batch_size,
                        show_progress=not self.config.disable_tqdm)

    # ------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, loop: _Loop) -> None:
        """checkpoint-N/ appears complete or not at all: written to a temp dir, then renamed."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{loop.step}"
        tmp = self.output_dir / f".checkpoint-{loop.step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_adapter(self.model, tmp)  # the usable PEFT-format adapter (trimmed to live ranks)
            self._save_adapter_state(tmp)
            torch.save(loop.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(loop.scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": loop.step, "micro_batches": loop.micro, "nonfinite_steps": self.nonfinite_steps,
                     "nonfinite_total": self.nonfinite_total, "world_size": acc.num_processes,
                     "config": self.config.to_dict(), "fingerprint": self.fingerprint}
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

    def _save_adapter_state(self, path: Path) -> None:
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(path / TRAINABLE_NAME))  # every trainable tensor, untrimmed, for exact resume
        torch.save(self.controller.state_dict(), path / "controller.pt")

    def _load_adapter_state(self, path: Path) -> None:
        self.controller.load_state_dict(torch.load(path / "controller.pt", weights_only=True))
        saved = load_file(str(path / TRAINABLE_NAME))
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if saved.keys() != params.keys() or any(saved[n].shape != p.shape for n, p in params.items()):
            raise ValueError(f"{path / TRAINABLE_NAME} does not fit this model's trainable parameters; resume "
                             "with the same adapter config the checkpoint was written with")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])

    def _rotate_checkpoints(self) -> None:
        """Keep the newest save_total_limit checkpoints of this run; never touch another run's."""
        limit = self.config.save_total_limit
        if limit:
            ours = [c for c in checkpoints(self.output_dir)
                    if json.loads((c / STATE_NAME).read_text()).get("fingerprint") == self.fingerprint]
            for old in ours[:-limit]:
                shutil.rmtree(old)

    def _fingerprint(self) -> dict[str, Any]:
        """What defines the run, checked on resume: the frozen base (names, shapes and a sample of
        values, so another model of the same shapes differs), the adapter config, the data."""
        base = hashlib.sha256()
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                flat = p.detach().reshape(-1)
                sample = torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy().tobytes()
                base.update(f"{name}{tuple(p.shape)}".encode() + sample)
        data = hashlib.sha256(str(len(self.train_dataset)).encode())
        every = max(1, len(self.train_dataset) // 2048)  # at most ~2048 examples: cheap for big datasets
        for i in range(0, len(self.train_dataset), every):
            for key, value in sorted(self.train_dataset[i].items()):
                data.update(key.encode() + torch.as_tensor(value).numpy().tobytes())
        adapter = json.loads(json.dumps(self.model.peftlab.config.to_dict(), default=str))
        return {"base_model": base.hexdigest()[:16], "adapter": adapter, "data": data.hexdigest()[:16]}

    def _clear_earlier_run(self) -> None:
        """A fresh run never mixes with the checkpoints of an earlier one in its output_dir."""
        earlier = checkpoints(self.output_dir)
        if not earlier:
            return
        names = ", ".join(p.name for p in earlier)
        if not self.config.overwrite_output_dir:
            raise ValueError(f"{self.output_dir} holds checkpoints of an earlier run ({names}); resume it with "
                             "resume_from_checkpoint=True (CLI: --resume), choose another output_dir, or set "
                             "overwrite_output_dir=true to delete them and start over")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for path in earlier:
                shutil.rmtree(path)
            self.accelerator.print(f"peftlab: overwrite_output_dir: deleted the earlier run's {names}")
        self.accelerator.wait_for_everyone()

    def _lock(self) -> None:
        """One run per output_dir: a lock file with the owner's pid; a dead owner's lock is taken over."""
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / LOCK_NAME
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = path.read_text().strip()
                pid = int(owner) if owner.isdigit() else 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RuntimeError(f"{self.output_dir} is in use by another peftlab run (pid {pid}); wait for it "
                                       "to finish or choose another output_dir") from None
                self.accelerator.print(f"peftlab: taking over the stale lock of a process that is gone (pid {owner})")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return

    def _unlock(self) -> None:
        if self.accelerator.is_main_process:
            (self.output_dir / LOCK_NAME).unlink(missing_ok=True)

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
        saved, now = state.get("fingerprint") or {}, self.fingerprint
        if saved.get("base_model") != now["base_model"]:
            raise ValueError(f"{path} was written for another base model; resume with the model it trained")
        if saved.get("data") != now["data"]:
            raise ValueError(f"{path} was written for other training data; resume with the same dataset and data "
                             "settings, or start a fresh run from its adapter")
        adapter = saved.get("adapter") or {}
        changed = {k: (adapter.get(k), v) for k, v in now["adapter"].items() if adapter.get(k) != v}
        if changed:
            raise ValueError(f"{path} was written with other adapter settings {changed} (saved, now); resume with "
                             "the same adapter config")
        ignored = ("output_dir", "disable_tqdm", "report_to", "overwrite_output_dir")
        saved = {k: v for k, v in state["config"].items() if k not in ignored}
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

    # ----------------------------------------------------------------- logging
    def _start_metrics(self, step: int) -> None:
        """One consistent series per run: a fresh run starts metrics.jsonl anew, a resumed one drops
        what the interrupted run logged after its checkpoint."""
        path = self.output_dir / METRICS_NAME
        if not self.accelerator.is_main_process:
            return
        kept = []
        if step and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def _log(self, metrics: dict[str, Any], report: dict[str, Any] | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {**metrics, **({"report": report} if report else {})}
        with open(self.output_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=metrics["step"])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Sequence[dict[str, Any]] | None, collate: Callable,
             accelerator: Accelerator | None, batch_size: int, show_progress: bool = True) -> dict[str, float]:
    """Loss, plus accuracy (classification) or perplexity (causal LM); with an accelerator, each
    process scores its share and the totals are summed."""
    if dataset is None or len(dataset) == 0:
        raise ValueError("evaluate() needs a non-empty eval_dataset")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    mine = list(range(rank, len(dataset), world))
    batches = math.ceil(math.ceil(len(dataset) / world) / batch_size)  # the same count on every process
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, count, correct
    causal = False
    model.eval()
    for j in progress(range(0, batches * batch_size, batch_size), desc="eval", leave=False,
                      quiet=not show_progress or rank != 0):
        rows = mine[j:j + batch_size]
        # a process whose share ran out still runs a forward: a sharded model gathers weights in each
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in rows or [0]]).items()}
        labels = batch.pop("labels")
        with accelerator.autocast() if accelerator else nullcontext():
            logits = model(**batch).logits.float()
        if not rows:
            continue
        if logits.dim() == 3:  # causal LM: predict token t+1 from tokens <= t
            causal = True
            logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        keep = labels != -100
        totals[0] += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").double()
        totals[1] += keep.sum()
        totals[2] += (logits[keep].argmax(-1) == labels[keep]).sum()
    if accelerator:
        totals = accelerator.reduce(totals, "sum")
    if totals[1] == 0:
        raise ValueError("the eval data has no target tokens (every label is -100); nothing to score")
    loss = (totals[0] / totals[1]).item()
    if causal:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    return {"eval_loss": loss, "eval_accuracy": (totals[2] / totals[1]).item()}


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories in `output_dir`, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _no_sync(acc: Accelerator, model: nn.Module):
    """No gradient averaging on this micro-batch (DDP's no_sync, or a sharded model's)."""
    return no_sync(model) if is_sharded(model) else acc.no_sync(model)


def _schedule_name(kind: str, warmup: int) -> str:
    # transformers' "constant" ignores warm-up; with warm-up steps it is "constant_with_warmup"
    return "constant_with_warmup" if kind == "constant" and warmup else kind


def _trackers(report_to: str) -> list[str] | None:
    """Accelerate trackers for `report_to`: 'auto' is TensorBoard when it is installed."""
    if report_to == "auto":
        report_to = "tensorboard" if _installed("tensorboard") or _installed("tensorboardX") else "none"
    if report_to == "none":
        return None
    names = [name.strip() for name in report_to.split(",")]
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
    for name in names:
        if not any(_installed(p) for p in packages[name]):
            raise ValueError(f"report_to={name} needs the {packages[name][0]} package: pip install {packages[name][0]} "
                             "(or report_to=none)")
    return names


def _check_launch(processes: int) -> None:
    """Refuse a launch that asked for several processes but got one: training alone (or as
    several independent runs) would silently differ from what was asked for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    requested = max(world, _requested_by_launcher())
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast runs bfloat16 everywhere (fast with AVX512-BF16/AMX)


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError("gradient_checkpointing=True needs a transformers model (gradient_checkpointing_enable)")
    # non-reentrant: works with frozen inputs and gives adapters their gradients (PEFT #1142)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
