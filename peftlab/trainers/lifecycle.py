"""The adapter's lifecycle as every front end runs it: peftlab.Trainer and the transformers
callback call these, and nothing else, around their own loops.

    start(total_steps)           the run's length reaches scheduled controllers
    prepare_batches(...)         which examples a data-driven init (EVA) sees: the same rule everywhere
    prepare(batches)             once, before the optimizer exists
    bind(optimizer)
    for each optimizer step:
        with_penalty(loss, step)        the regularizer joins the loss once per step
        before_step(step) -> applied    after accumulation and clipping, before optimizer.step()
        optimizer.step(); after_step(step, applied); scheduler.step()
    save(dir) / load(dir)         controller state and the skip counters, one file

A step whose gradient (or loss) is NaN/inf is skipped whole: its gradients are dropped, so
`optimizer.step()` moves no weight and no optimizer state, and no controller hook sees it. The step
still counts (the step counter and the learning-rate schedule move on), which is what a
transformers.Trainer does with it too, so both front ends agree step by step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..adapters.controller import Controller
from ..adapters.inject import controller as controller_of

CONTROLLER_FILE = "peftlab_controller.pt"
Batch = dict[str, Tensor]


class NonFiniteLossError(RuntimeError):
    pass


def prepare_batches(dataset: Sequence[dict[str, Any]], collate: Callable, per_device: int, world: int, rank: int,
                    count: int, device: torch.device | str = "cpu") -> list[Batch]:
    """The first `count` global batches of the data in its stored order, for data-driven init (EVA).
    Batch j covers the same examples whatever the process count: each process takes its slice of
    it, so statistics gathered across processes equal a single process's."""
    count = min(count, len(dataset) // (per_device * world))
    batches = []
    for j in range(count):
        start = (j * world + rank) * per_device
        batch = collate([dataset[i] for i in range(start, start + per_device)])
        batches.append({k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)})
    return batches


class Lifecycle:
    """One wrapped model's controller, driven the same way by every front end."""

    def __init__(self, model: nn.Module, max_nonfinite_steps: int = 5, say: Callable[[str], None] = print):
        self.model, self.max_nonfinite_steps, self.say = model, max_nonfinite_steps, say
        self.skipped_total = 0
        self.skipped_in_a_row = 0

    @property
    def controller(self) -> Controller:
        return controller_of(self.model)

    @property
    def needs_prepare(self) -> bool:
        return type(self.controller).prepare is not Controller.prepare

    def start(self, total_steps: int) -> None:
        self.controller.expect_total_steps(total_steps)

    def prepare(self, batches: list[Batch]) -> None:
        self.controller.prepare(batches)

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        self.controller.bind_optimizer(optimizer)

    def with_penalty(self, loss: Tensor, step: int, scale: float = 1.0) -> Tensor:
        """The loss with the controller's regularizer (AdaLoRA's orthogonality term, SaRA's nuclear
        norm) added; `scale` undoes whatever the front end later divides the loss by."""
        penalty = self.controller.penalty(step)
        return loss + penalty * scale if isinstance(penalty, Tensor) else loss

    def before_step(self, step: int, loss: Tensor | None = None) -> bool:
        """Gradients are final. True: the controller's before-hook ran and the step applies; False:
        the gradient or loss is not finite, the gradients are dropped and the step moves nothing."""
        trainable = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in trainable)
        if finite and (loss is None or bool(torch.isfinite(loss))):
            self.skipped_in_a_row = 0
            self.controller.before_optimizer_step(step)
            return True
        for p in trainable:
            p.grad = None
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        what = f"loss={float(loss)}" if loss is not None else "a NaN/inf gradient"
        if self.skipped_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient (last at step "
                f"{step + 1}: {what}); stopping. Lower learning_rate, enable max_grad_norm, or check the data for "
                "empty or broken examples")
        self.say(f"peftlab: step {step + 1} skipped ({what}); weights and adapter state unchanged")
        return False

    def after_step(self, step: int, applied: bool) -> None:
        if applied:
            self.controller.after_optimizer_step(step)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(),
                "skipped": torch.tensor([self.skipped_total, self.skipped_in_a_row])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.skipped_total, self.skipped_in_a_row = (int(v) for v in state["skipped"])

    def save(self, directory: str | Path) -> None:
        torch.save(self.state_dict(), Path(directory) / CONTROLLER_FILE)

    def load(self, directory: str | Path) -> None:
        self.load_state_dict(read_state(Path(directory) / CONTROLLER_FILE))


def read_state(path: Path) -> dict[str, Any]:
    """A tensor-only torch file (never pickle), with an error that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is damaged") from None
