"""A run's directory: the lock that gives it one run at a time, the fingerprint that keeps runs
from mixing, checkpoints that appear whole or not at all, and the cached result of `prepare`.

Checkpoints hold only trainable tensors (safetensors) and tensor-only torch files read with
`weights_only=True` (never pickle), written to a temp directory that is renamed when complete.
Accelerate's `save_state` would store the whole base model in each and reads RNG state back with
pickle. Resuming reads every file of a checkpoint before applying any, so a damaged newest
checkpoint falls back to the previous one, saying why.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.inject import active_adapter, state_of
from ..io import ADAPTER_FILES, RUN_RECORD, save_adapter
from .lifecycle import CONTROLLER_FILE, Lifecycle, read_state

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable_state.safetensors"
LOCK_NAME = ".peftlab.lock"
# settings that do not change what is trained: a resumed run may differ in them
OUTSIDE_TRAINING = ("output_dir", "disable_tqdm", "report_to", "overwrite_output_dir", "do_eval", "eval_steps",
                    "per_device_eval_batch_size", "logging_steps", "save_steps", "save_total_limit")
METRICS_NAME = "metrics.jsonl"
# what a finished run leaves beside its checkpoints (the plots are run.py's)
RECORD_FILES = (*ADAPTER_FILES, RUN_RECORD, METRICS_NAME, "loss.png", "ranks.png")


def fingerprint(model: nn.Module, dataset: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What defines a run, checked on resume: every byte of every frozen base tensor, every byte of
    every training example, and the adapter config (SHA-256, streamed: ~1.8 GB/s, a 1B float32
    model in about 2.5 s)."""
    base = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            base.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            base.update(_bytes(p))
    data = hashlib.sha256(str(len(dataset)).encode())
    for row in dataset:
        for key, value in sorted(row.items()):
            data.update(key.encode() + _bytes(torch.as_tensor(value)))
    adapter = json.loads(json.dumps(state_of(model).config.to_dict(), default=str))
    return {"base_model": base.hexdigest()[:16], "adapter": adapter, "data": data.hexdigest()[:16]}


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    t = getattr(t, "_local_tensor", t)  # a DTensor's own shard
    return memoryview(t.cpu().contiguous().view(-1).view(torch.uint8).numpy())


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories in `output_dir`, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, read and checked before any of it is applied."""

    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    lifecycle: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]

    @classmethod
    def read(cls, path: Path, rank: int) -> "Checkpoint":
        try:
            state = json.loads((path / STATE_NAME).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path / STATE_NAME} cannot be read ({e}); it is damaged") from None
        missing = {"step", "micro_batches", "world_size", "config", "fingerprint"} - set(state)
        if missing:
            raise ValueError(f"{path / STATE_NAME} lacks {sorted(missing)}; it is damaged")
        try:
            trainable = load_file(str(path / TRAINABLE_NAME))
        except Exception as e:
            raise ValueError(f"{path / TRAINABLE_NAME} cannot be read ({str(e)[:200]}); it is damaged") from None
        return cls(path, state, trainable, read_state(path / CONTROLLER_FILE), read_state(path / "optimizer.pt"),
                   read_state(path / "scheduler.pt"), read_state(path / f"rng_state_{rank}.pt"))

    def check_resumable(self, now: dict[str, Any], config: Any, processes: int, total: int) -> None:
        """This checkpoint belongs to the run about to resume: same process count, base model, data,
        adapter and training settings (fingerprint `now`), and it is not the run's end."""
        path, state = self.path, self.state
        if state["world_size"] != processes:
            raise ValueError(f"{path} was written by {state['world_size']} processes but this run has {processes}; "
                             "exact resume needs the same process count (the data order depends on it)")
        saved = state["fingerprint"]
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
        changed = {k: (v, getattr(config, k, None)) for k, v in state["config"].items()
                   if k not in OUTSIDE_TRAINING and getattr(config, k, None) != v}
        if changed:
            raise ValueError(f"{path} was written with other settings {changed} (saved, now); "
                             "resume with the same config, or start a fresh run from the adapter")
        if state["step"] >= total:
            raise ValueError(f"{path} is the end of a finished run (step {state['step']} of {total}); there is "
                             "nothing to resume. Its adapter is in the output directory")

    def restore_adapter(self, model: nn.Module, lifecycle: Lifecycle) -> None:
        """Controller state (which may reshape EVA's layers) and trainable tensors, before the
        optimizer is built over them."""
        lifecycle.load_state_dict(self.lifecycle)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.trainable.keys() != params.keys() or any(self.trainable[n].shape != p.shape for n, p in params.items()):
            raise ValueError(f"{self.path / TRAINABLE_NAME} does not fit this model's trainable parameters; resume "
                             "with the same adapter config the checkpoint was written with")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.trainable[name])

    def restore_training(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, int]:
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        torch.set_rng_state(self.rng["torch"])
        random.setstate(_python_rng(self.rng["python"]))
        if "cuda" in self.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng["cuda"])
        return self.state["step"], self.state["micro_batches"]


def _python_rng(state: Any) -> tuple:
    """random.getstate() as torch.save stored it (tuples become lists in some versions)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def write_checkpoint(directory: Path, model: nn.Module, lifecycle: Lifecycle, optimizer: torch.optim.Optimizer,
                     scheduler: Any, state: dict[str, Any], accelerator: Any) -> None:
    """checkpoint-N/ appears complete or not at all: written to a temp directory, then renamed.
    A failed write (a full disk) removes the temp directory and names the file and the cause."""
    main, tmp = accelerator.is_main_process, directory.with_name(f".{directory.name}.tmp")
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_adapter(model, tmp, active_adapter(model))  # the usable PEFT-format adapter (trimmed to live ranks)
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            _write(tmp / TRAINABLE_NAME, lambda f: save_file(trainable, f))  # untrimmed, for exact resume
            _write(tmp / CONTROLLER_FILE, lambda f: torch.save(lifecycle.state_dict(), f))
            _write(tmp / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
            _write(tmp / "scheduler.pt", lambda f: torch.save(scheduler.state_dict(), f))
            _write(tmp / STATE_NAME, lambda f: Path(f).write_text(json.dumps(state, indent=2)))
        accelerator.wait_for_everyone()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        _write(tmp / f"rng_state_{accelerator.process_index}.pt", lambda f: torch.save(rng, f))
        accelerator.wait_for_everyone()
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    accelerator.wait_for_everyone()


def _write(path: Path, write: Callable[[str], None]) -> None:
    """`write(path)`, with a failure reported as the file and the cause (torch's own message for a
    full disk is "[enforce fail at inline_container.cc] unexpected pos")."""
    try:
        write(str(path))
    except Exception as e:
        full = shutil.disk_usage(path.parent).free < 1 << 20
        cause = os.strerror(errno.ENOSPC) if full else f"{type(e).__name__}: {str(e)[:200]}"
        path.unlink(missing_ok=True)
        raise OSError(errno.ENOSPC if full else errno.EIO, f"could not write {path} ({cause})") from None


def resumable(output_dir: Path, requested: bool | str, rank: int, say: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint to resume from: the given one, or with True the newest that reads whole (a
    damaged one is passed over, saying why); None when no resume was asked for."""
    if not requested:
        return None
    if requested is not True:
        path = Path(requested)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a peftlab checkpoint (no {STATE_NAME})")
        return Checkpoint.read(path, rank)
    found = checkpoints(output_dir)
    if not found:
        raise FileNotFoundError(f"resume requested but {output_dir} holds no checkpoint-N directory; train with "
                                "save_steps > 0 first, or drop resume")
    problems = []
    for path in reversed(found):
        try:
            checkpoint = Checkpoint.read(path, rank)
        except (OSError, ValueError) as e:
            problems.append(str(e))
            continue
        if problems:
            say(f"peftlab: {'; '.join(problems)}. Resuming from the previous good checkpoint, {path.name}")
        return checkpoint
    raise ValueError(f"no checkpoint in {output_dir} can be resumed: {'; '.join(problems)}")


class RunDirectory:
    """One run's output directory, as seen from every process (only the first writes)."""

    def __init__(self, path: str | os.PathLike, accelerator: Any):
        self.path, self.accelerator = Path(path), accelerator
        self._lock_fd: int | None = None

    # --- one run at a time ---
    def lock(self) -> None:
        """An flock on `.peftlab.lock`, held while the run lives: the kernel releases it when the
        process ends however it ends, so a dead run's lock is never stale and a reused pid is no owner."""
        if not self.accelerator.is_main_process:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / LOCK_NAME
        while True:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RuntimeError(f"{self.path} is in use by another peftlab run (pid {owner}); wait for it to finish "
                                   "or choose another output_dir") from None
            if os.path.exists(path) and os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
            os.close(fd)  # the holder before us removed the file as we opened it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- runs never mix ---
    def refuse_earlier_run(self, overwrite: bool) -> None:
        """A fresh run never lands beside an earlier run's checkpoints or record (adapter, run.json,
        metrics, plots): it is refused, or with `overwrite` they are deleted first."""
        earlier = checkpoints(self.path) + [self.path / name for name in RECORD_FILES if (self.path / name).exists()]
        self.accelerator.wait_for_everyone()  # every process has looked before the first one writes
        if not earlier:
            return
        names = ", ".join(p.name for p in earlier)
        if not overwrite:
            raise ValueError(f"{self.path} holds an earlier run ({names}); resume it with resume_from_checkpoint=True "
                             "(CLI: --resume), choose another output_dir, or set overwrite_output_dir=true to delete "
                             "them and start over")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for path in earlier:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.accelerator.print(f"peftlab: overwrite_output_dir: deleted the earlier run's {names}")
        self.accelerator.wait_for_everyone()

    def remove_leftovers(self) -> None:
        """A checkpoint a crash left half-written is never resumed from."""
        if self.accelerator.is_main_process:
            for leftover in self.path.glob(".checkpoint-*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)

    def rotate(self, limit: int, run_fingerprint: dict[str, Any]) -> None:
        """Keep the newest `limit` checkpoints of this run; never touch another run's."""
        if not (limit and self.accelerator.is_main_process):
            return
        ours = [c for c in checkpoints(self.path)
                if json.loads((c / STATE_NAME).read_text()).get("fingerprint") == run_fingerprint]
        for old in ours[:-limit]:
            shutil.rmtree(old)

    # --- prepare, once ---
    def prepare_cached(self, lifecycle: Lifecycle, batches: list[dict[str, torch.Tensor]], key: dict[str, Any]) -> None:
        """Run `prepare` (EVA's PCA, ...) once: its result is cached here, keyed by everything it
        depends on (base model, adapter config, the batches it saw), so a restarted run reuses it."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        for batch in batches:
            for name in sorted(batch):
                digest.update(name.encode() + _bytes(batch[name]))
        cache = self.path / "prepare_cache" / f"{digest.hexdigest()[:16]}_{self.accelerator.process_index}"
        if (cache / TRAINABLE_NAME).is_file():
            try:
                lifecycle.load(cache)
                with torch.no_grad():
                    saved = load_file(str(cache / TRAINABLE_NAME))
                    for name, param in ((n, p) for n, p in lifecycle.model.named_parameters() if p.requires_grad):
                        param.copy_(saved[name])
                self.accelerator.print(f"peftlab: prepare result reused from {cache}")
                return
            except (OSError, ValueError, KeyError, RuntimeError):
                shutil.rmtree(cache, ignore_errors=True)  # damaged: compute it again
        lifecycle.prepare(batches)
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().cpu().contiguous() for n, p in lifecycle.model.named_parameters() if p.requires_grad}
        _write(tmp / TRAINABLE_NAME, lambda f: save_file(trainable, f))
        lifecycle.save(tmp)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
