"""What a method does between optimizer steps: the hooks every front end calls at the same points.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .config import AdapterConfig, ScheduledConfig
from .layer import AdapterLayer, set_module


class Controller:
    """What a method does between optimizer steps. The default does nothing (plain LoRA).

    The trainer, the transformers callback and hand-written loops call these hooks at the same
    points (README, "Python API"); no front end knows any method by name.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer]):
        self.model = model
        self.config = config
        self.layers = layers  # module name -> wrapper, in model order
        self.optimizer: torch.optim.Optimizer | None = None

    def prepare(self, batches: Iterable[dict[str, Tensor]]) -> None:
        """One-off work after wrapping, before the optimizer exists; consumes no optimizer step."""

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Front ends hand over the optimizer once it exists (SaRA resets state when it re-selects)."""
        if any(type(p).__name__ == "DTensor" for layer in self.layers.values() for p in layer.adapter_parameters().values()):
            # fully_shard without ignored_params: controllers would mix whole tensors with shards
            raise ValueError("the adapter's parameters were sharded (fully_shard on the wrapped model); shard with "
                             "peftlab.shard(model) instead, which shards the base and keeps the adapter whole")
        self.optimizer = optimizer

    def expect_total_steps(self, total_steps: int) -> None:
        """Front ends announce how many optimizer steps they will run (schedules are laid out over it)."""

    def release_layers(self, names: list[str]) -> None:
        """Put the base modules of `names` back in the model (layers a method assigned no rank)."""
        for name in names:
            layer = self.layers.pop(name)
            if layer.fusion is not None:
                layer.fusion.drop(layer)
            set_module(self.model, name, layer.base_layer)

    def penalty(self, step: int) -> Tensor | float:
        """A regularizer added to the training loss of optimizer step `step` (once per step), so that
        clipping and the logged gradient norm see it as in the papers' code: `loss + ctl.penalty(step)`."""
        return 0.0

    def before_optimizer_step(self, step: int) -> None:
        """Gradients are final (accumulated, clipped, all-reduced); `step` counts finished steps."""

    def after_optimizer_step(self, step: int) -> None:
        """Weights are updated and gradients not yet zeroed."""

    def shared_state(self) -> dict[str, Tensor]:
        """Tensors the adapter file holds besides the layers' (under their own keys), e.g. bases."""
        return {}

    def load_shared_state(self, tensors: dict[str, Tensor]) -> set[str]:
        """Take what is yours of a file's tensors that belong to no layer; returns the keys taken."""
        return set()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state)

    def check_state_keys(self, state: dict[str, Any]) -> None:
        """A checkpoint's controller state must fit this model exactly (same method, same layers)."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"{type(self).__name__} state does not fit this model: missing "
                             f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")

    def report(self) -> dict[str, Any]:
        """Values for the logger, e.g. the live rank of each module and the budget."""
        return {}


class ScheduledController(Controller):
    """A controller whose schedule is laid out over the run's length (AdaLoRA's budget, IncreLoRA's
    growth, SaRA's re-selection). The length is the config's `total_step` when given; otherwise the
    front end announces it through `expect_total_steps`, and a mismatch is an error rather than a
    schedule that silently ends early or never (PEFT #1801's class of bug)."""

    config: ScheduledConfig

    def __init__(self, model: nn.Module, config: ScheduledConfig, layers: dict[str, AdapterLayer]):
        super().__init__(model, config, layers)
        if config.total_step is not None:
            self.plan()

    @property
    def method(self) -> str:
        return self.config.method

    def expect_total_steps(self, total_steps: int) -> None:
        if self.config.total_step is None:
            self.config = replace(self.config, total_step=total_steps)  # validates the schedule against it
            self.plan()
        elif self.config.total_step != total_steps:
            raise ValueError(f"{self.method} total_step={self.config.total_step} but training runs {total_steps} "
                             f"optimizer steps; set total_step={total_steps} (or leave it unset: the trainer fills it in)")

    def plan(self) -> None:
        """Lay out the schedule over `self.config.total_step`."""

    def check_planned(self) -> None:
        if self.config.total_step is None:
            raise RuntimeError(
                f"{self.method} lays out its schedule over the run's length, which it was not told: call "
                "peftlab.controller(model).expect_total_steps(N) before training (peftlab.Trainer and "
                "PeftlabCallback do this), or wrap with total_step=N")
