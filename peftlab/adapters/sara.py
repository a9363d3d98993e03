"""SaRA (Hu et al., ICLR 2025, arXiv:2409.06633): train the base weights' own smallest entries.

    selected:  |W0| < θ   (one global threshold over every targeted layer; strict "<")
    forward:   W_eff = W0 with W_eff[idx] = k · values;  y = base_op(x, W_eff)
    loss:      + λ ‖W ⊙ M‖_*  on one random eligible matrix per step (its gradient U Vᵀ at idx)
    at T_p:    keep only the entries still below θ; the others freeze at their trained values

The trainable state is `values` (one entry per selected weight, stored divided by the step
scale k, so that AdamW moves each weight by k·lr per step) plus their indices: no dense mask,
and no dense gradient outlives the backward of its layer. The dense W_eff is rebuilt in
backward rather than kept. Two slips of the released code are not reproduced: its rank loss
never reaches the optimizer, and it writes |values| back unsigned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import quant
from ..settings import Check, above, at_least, opt
from .config import ScheduledConfig
from .controller import ScheduledController
from .folded import FoldedLayer
from .layer import AdapterLayer
from .registry import register

RANK_MIN_DIM, RANK_MIN_NNZ = 64, 100  # the official eligibility for the nuclear-norm loss


class SaRALayer(FoldedLayer):
    def __init__(self, base_layer: nn.Module, config: "SaRAConfig", name: str):
        super().__init__(base_layer)
        if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise ValueError(f"sara supports Conv2d with padding_mode='zeros', {name} uses {base_layer.padding_mode!r}")
        count = config.selected_counts.get(name, 0)  # a saved adapter says how many; a fresh one selects later
        weight = self.storage_weight()
        self.weight_shape, device = weight.shape, weight.device
        self.register_buffer("idx", torch.zeros(count, dtype=torch.long, device=device))
        self.register_buffer("base_values", torch.zeros(count, device=device))    # W0 at idx
        self.register_buffer("frozen", torch.zeros(count, dtype=torch.bool, device=device))
        self.register_buffer("frozen_values", torch.zeros(0, device=device))     # set by re-selection
        self.values = nn.Parameter(torch.zeros(count, device=device))                # W[idx] / step_scale
        self.threshold = config.threshold
        self.step_scale = config.step_scale

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return quant.is_adaptable(module) or isinstance(module, nn.Conv2d)

    def live_weight(self, dtype: torch.dtype, values: Tensor) -> Tensor:
        weight = self.storage_weight().to(dtype=dtype, copy=True)
        values = values * self.step_scale
        if len(self.frozen_values):
            values = torch.where(self.frozen, self.frozen_values, values)
        weight.view(-1)[self.idx] = values.to(dtype)
        return weight

    def param_grads(self, grad_weight: Tensor, values: Tensor) -> tuple[Tensor]:
        grad = grad_weight.reshape(-1)[self.idx].to(values.dtype) * self.step_scale  # the dense gradient dies here
        grad[self.frozen] = 0
        return (grad,)

    # --- selection ---
    @torch.no_grad()
    def select(self, threshold: float) -> None:
        """Train every entry with |W0| < threshold (compared in the weight's dtype)."""
        flat = self.storage_weight().detach().reshape(-1)
        self.idx = torch.nonzero(flat.abs() < threshold)[:, 0]
        self.base_values = flat[self.idx].float()
        self.frozen = torch.zeros_like(self.idx, dtype=torch.bool)
        self.values = nn.Parameter(self.base_values / self.step_scale)
        self.threshold = threshold

    @torch.no_grad()
    def reselect(self) -> int:
        """Progressive adjustment (paper §3.3): entries that grew past θ freeze at their trained values."""
        current = self.effective_values()
        self.frozen |= current.abs() >= self.threshold
        self.frozen_values = current.clone()
        return int((~self.frozen).sum())

    def trained_weights(self) -> Tensor:
        """The weights at idx as the forward uses them (k · values), differentiable."""
        return self.values * self.step_scale

    def effective_values(self) -> Tensor:
        """The trained weights at idx (frozen ones at the values they froze with)."""
        values = self.trained_weights().detach()
        return torch.where(self.frozen, self.frozen_values, values) if len(self.frozen_values) else values

    # --- the adapter contract ---
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"values": self.values}

    def delta_weight(self) -> Tensor:
        delta = torch.zeros(self.weight_shape, device=self.idx.device)
        delta.view(-1)[self.idx] = self.effective_values().float() - self.base_values
        return self.to_canonical(delta)  # (d_out, d_in); a Conv2d kernel flattened

    def branch(self, x: Tensor) -> Tensor:
        """The update's own contribution, x ΔWᵀ (a dense reference for tests; forward fuses it)."""
        return x @ self.delta_weight().t()

    def peft_state(self) -> dict[str, Tensor]:
        return {"sara_idx": self.idx, "sara_delta": self.effective_values().float() - self.base_values,
                "sara_frozen": self.frozen.to(torch.uint8)}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor]) -> None:
        idx, size = state["sara_idx"], self.weight_shape.numel()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= size or len(torch.unique(idx)) != len(idx)):
            raise ValueError(f"sara_idx must hold distinct positions in [0, {size}) of the base weight; these are "
                             "negative, out of range or repeated (a damaged or foreign file)")
        self.idx.copy_(idx)
        self.base_values.copy_(self.storage_weight().detach().reshape(-1)[self.idx].float())
        self.values.copy_((self.base_values + state["sara_delta"]) / self.step_scale)
        self.frozen.copy_(state["sara_frozen"].bool())
        self.frozen_values = self.trained_weights().detach() if self.frozen.any() else self.frozen_values[:0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, selected={len(self.idx)}, trainable={int((~self.frozen).sum())}"


def global_threshold(layers: list[SaRALayer], fraction: float) -> float:
    """θ such that a `fraction` of all targeted weights has |w| < θ (bisection; no giant concat)."""
    weights = [layer.storage_weight().detach().abs().reshape(-1) for layer in layers]
    target = fraction * sum(w.numel() for w in weights)
    low, high = 0.0, max(float(w.max()) for w in weights) * 2 + 1e-12
    for _ in range(60):
        mid = (low + high) / 2
        if sum(int((w < mid).sum()) for w in weights) < target:
            low = mid
        else:
            high = mid
    return high


class SaRAController(ScheduledController):
    def __init__(self, model: nn.Module, config: "SaRAConfig", layers: dict[str, SaRALayer]):
        super().__init__(model, config, layers)
        if not config.selected_counts:  # a fresh wrap: choose the entries (a loaded adapter brings its own)
            threshold = config.threshold
            if threshold is None:
                threshold = global_threshold(list(layers.values()), config.target_fraction)
            for layer in layers.values():
                layer.select(threshold)
        self.reselected = False
        self.nuclear_norm = 0.0

    def plan(self) -> None:
        self.progressive_step = self.config.progressive_step or self.config.total_step // 2

    def eligible(self) -> list[str]:
        return [name for name, layer in self.layers.items()
                if len(layer.weight_shape) == 2 and min(layer.weight_shape) > RANK_MIN_DIM
                and int((~layer.frozen).sum()) > RANK_MIN_NNZ]

    def penalty(self, step: int) -> Tensor | float:
        """λ‖W ⊙ M‖_* of one eligible matrix (its trained, unfrozen entries), paper eq. 5; one matrix
        per step as the released code, drawn from the step number so every process agrees."""
        candidates = self.eligible()
        if self.config.lambda_rank <= 0 or not candidates:
            return 0.0
        pick = int(torch.randint(len(candidates), (1,), generator=torch.Generator().manual_seed(step)))
        layer = self.layers[candidates[pick]]
        live = ~layer.frozen
        matrix = torch.zeros(layer.weight_shape.numel(), device=layer.idx.device, dtype=layer.values.dtype)
        matrix = matrix.index_put((layer.idx[live],), layer.trained_weights()[live]).view(layer.weight_shape)
        norm = torch.linalg.matrix_norm(matrix.float(), "nuc")  # its gradient is U Vᵀ at the entries
        self.nuclear_norm = float(norm.detach())
        return self.config.lambda_rank * norm

    def before_optimizer_step(self, step: int) -> None:
        self.check_planned()
        if self.optimizer is None and not self.reselected:
            raise RuntimeError(
                "sara's progressive re-selection resets the optimizer state of the re-selected entries, so it "
                "needs the optimizer: call peftlab.controller(model).bind_optimizer(optimizer) after building it "
                "(peftlab.Trainer and PeftlabCallback do this)")

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if self.reselected or step + 1 < self.progressive_step:  # a skipped step must not skip it
            return
        for layer in self.layers.values():
            layer.reselect()
            self.optimizer.state.pop(layer.values, None)  # fresh moments and bias correction
        self.reselected = True

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"reselected": torch.tensor(self.reselected)}
        for name, layer in self.layers.items():
            state[f"frozen.{name}"] = layer.frozen.clone()
            state[f"frozen_values.{name}"] = layer.frozen_values.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state)
        for name, layer in self.layers.items():
            layer.frozen.copy_(state[f"frozen.{name}"])
            layer.frozen_values = state[f"frozen_values.{name}"].clone().to(layer.idx.device)
        self.reselected = bool(state["reselected"])

    def report(self) -> dict[str, Any]:
        selected = sum(len(layer.idx) for layer in self.layers.values())
        trainable = sum(int((~layer.frozen).sum()) for layer in self.layers.values())
        total = sum(layer.weight_shape.numel() for layer in self.layers.values())
        return {"selected": selected, "trainable": trainable, "sparsity": 1 - trainable / max(total, 1),
                "nuclear_norm": self.nuclear_norm}


@register("sara", layer=SaRALayer, controller=SaRAController, peft_type="PEFTLAB_SARA")
@dataclass(frozen=True, kw_only=True)
class SaRAConfig(ScheduledConfig):
    """SaRA, Hu et al. 2025 (arXiv:2409.06633): sparse fine-tuning of the smallest base weights."""

    # the weights trained directly, λ of the paper's hyper-parameter study (App. K); the released README uses 5e-4
    presets = {"paper": {"step_scale": 1.0, "lambda_rank": 5e-3}}

    target_fraction: float | None = opt(0.05, "fraction of the targeted weights to train (global over layers)",
                                        check=Check(lambda v: 0 < v < 1, "in (0, 1)"))
    threshold: float | None = opt(None, "train every weight with |w| < threshold instead (the paper's rule)",
                                  check=above(0))
    progressive_step: int | None = opt(None, "optimizer steps before the progressive re-selection; default half "
                                             "of total_step", check=at_least(1))
    lambda_rank: float = opt(5e-4, "weight of the nuclear-norm low-rank loss (README 5e-4; paper 5e-3)",
                             check=at_least(0))
    # The paper trains the weights directly (k = 1). Their steps then stay the size of LoRA's first ones
    # while LoRA's grow as both its factors turn toward the gradient; k = 2 brings SaRA to LoRA's accuracy
    # at LoRA's learning rate on the generated task (93% -> 99.8% at 1e-3), checked on the reviews benchmark
    step_scale: float = opt(2.0, "AdamW moves each selected weight by step_scale x lr per step (1 = the paper)",
                            check=above(0))
    selected_counts: dict[str, int] = opt({}, "selected entries per module (written on save, read on load)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_step is not None and self.total_step < 2:
            raise ValueError(f"sara needs total_step >= 2, the optimizer steps of the run (got {self.total_step!r})")
        if self.threshold is not None:
            object.__setattr__(self, "target_fraction", None)  # an explicit threshold is the rule
        elif self.target_fraction is None:
            raise ValueError("sara needs target_fraction (in (0, 1)) or a threshold")
        if self.progressive_step is not None and self.progressive_step >= (self.total_step or math.inf):
            raise ValueError(f"sara progressive_step={self.progressive_step} must be in [1, total_step={self.total_step})")

    @classmethod
    def for_budget(cls, shapes: list[tuple[int, int]], budget: int) -> dict[str, Any]:
        return {"target_fraction": round(budget / sum(d_out * d_in for d_out, d_in in shapes), 6)}

    def final_parameter_count(self, shapes: list[tuple[int, int]]) -> int:
        return int(self.target_fraction * sum(d_out * d_in for d_out, d_in in shapes))

    def peft_fields(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        fields = super().peft_fields(layers)
        fields["threshold"] = next(iter(layers.values())).threshold  # the θ the fraction resolved to
        fields["target_fraction"] = None
        fields["selected_counts"] = {name: len(layer.idx) for name, layer in layers.items()}
        return fields
