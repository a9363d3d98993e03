"""AdaLoRA (Zhang et al., ICLR 2023, arXiv:2303.10512): an SVD-shaped update whose singular
values are pruned by importance under a shrinking global rank budget.

    ΔW = c · P Λ Q = c · B (A ⊙ E),   A: (r0, d_in), E: (r0, 1), B: (d_out, r0),   c = α / (r0 + 1e-5)

The controller runs the method around optimizer steps (Algorithm 1 of the paper):
  penalty:               γ·R, the orthogonality regularizer on P and Q, joins the loss (eq. 4);
  after_optimizer_step:  updates the importance EMAs from w·∂L/∂w (eq. 5-7) and zeroes the
                         singular values of the least important triplets down to the cubic
                         budget b(t) (eq. 8, eq. 12). Shapes never change; masking only zeroes E.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..settings import at_least, opt
from .controller import ScheduledController
from .layer import AdapterLayer, check_rank
from .registry import register
from .svd import SVDConfig, SVDLinear, orthogonality_penalty, update_sensitivity


class AdaLoRALinear(SVDLinear):
    def __init__(self, base_layer: nn.Module, config: "AdaLoRAConfig", name: str):
        check_rank(config.init_r, base_layer, "init_r", name)
        # the scale keeps r0 for good, even after pruning and reloading, as the released code does
        super().__init__(base_layer, config.init_r, config.lora_alpha, config.init_r, config.lora_dropout)
        if config.init_like_lora:
            self.start_like_lora(config.init_r, config.target_r)
        pattern = config.rank_pattern.get(f"{name}.lora_E")
        if pattern is not None:  # a saved adapter: only the live triplets come from the file
            if len(pattern) != config.init_r:
                raise ValueError(f"rank_pattern of {name} has {len(pattern)} entries, expected init_r={config.init_r}")
            self.mask(torch.tensor(pattern, dtype=torch.bool, device=self.active.device))


class AdaLoRAController(ScheduledController):
    def __init__(self, model: nn.Module, config: "AdaLoRAConfig", layers: dict[str, SVDLinear]):
        super().__init__(model, config, layers)
        self.ema = {f"{name}.{key}": {"I": torch.zeros_like(p, dtype=torch.float32),
                                      "U": torch.zeros_like(p, dtype=torch.float32)}
                    for name, layer in layers.items() for key, p in layer.adapter_parameters().items()}
        self.initial_budget = sum(layer.lora_A.shape[0] for layer in layers.values())
        self.target_budget = config.target_r * len(layers)
        self.final = False  # the pattern is frozen once the final phase starts

    def budget(self, step: int) -> tuple[int, bool]:
        """b(t) and whether to mask at step t: the cubic schedule of eq. 12, in the released code's form."""
        cfg = self.config
        start, end = cfg.tinit, cfg.total_step - cfg.tfinal
        if step <= start:
            return self.initial_budget, False
        if step > end:
            return self.target_budget, True
        left = 1 - (step - start) / (end - start)
        budget = int(self.target_budget + (self.initial_budget - self.target_budget) * left ** 3)
        return budget, step % cfg.deltaT == 0 or step == end

    def triplet_scores(self, name: str) -> Tensor:
        """S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), with s = Ī·Ū (eq. 9)."""
        s = {k: self.ema[f"{name}.{k}"]["I"] * self.ema[f"{name}.{k}"]["U"] for k in ("lora_A", "lora_E", "lora_B")}
        return s["lora_E"][:, 0] + s["lora_A"].mean(1) + s["lora_B"].mean(0)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        scores = {name: self.triplet_scores(name) for name in self.layers}
        pruned = self.initial_budget - budget
        if pruned < 1:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), pruned).values
        for name, layer in self.layers.items():
            layer.mask(scores[name] > threshold)

    def penalty(self, step: int) -> Tensor | float:
        if self.config.orth_reg_weight == 0:
            return 0.0
        return self.config.orth_reg_weight * orthogonality_penalty([(l.lora_A, l.lora_B) for l in self.layers.values()])

    def after_optimizer_step(self, step: int) -> None:
        self.check_planned()
        cfg = self.config
        final_start = cfg.total_step - cfg.tfinal
        if step < final_start:
            for name, layer in self.layers.items():
                for key, p in layer.adapter_parameters().items():
                    if p.grad is not None:
                        update_sensitivity(self.ema[f"{name}.{key}"], p, cfg.beta1, cfg.beta2)
        budget, mask_now = self.budget(step)
        if step >= final_start and self.final:
            for layer in self.layers.values():  # re-apply the frozen pattern
                layer.mask(layer.active.clone())
        elif mask_now:
            self.mask_to_budget(budget)
            self.final = step >= final_start

    def state_dict(self) -> dict[str, Any]:
        state = {f"ema.{k}.{part}": v for k, pair in self.ema.items() for part, v in pair.items()}
        state.update({f"active.{name}": layer.active.clone() for name, layer in self.layers.items()})
        state["final"] = torch.tensor(self.final)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state)
        for key, pair in self.ema.items():
            for part in pair:
                pair[part].copy_(state[f"ema.{key}.{part}"])
        for name, layer in self.layers.items():
            layer.active.copy_(state[f"active.{name}"])
        self.final = bool(state["final"])

    def report(self) -> dict[str, Any]:
        ranks = {name: layer.rank for name, layer in self.layers.items()}
        return {"budget": sum(ranks.values()), "target_budget": self.target_budget, "ranks": ranks}


@register("adalora", layer=AdaLoRALinear, controller=AdaLoRAController, peft_type="ADALORA")
@dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(SVDConfig):
    """AdaLoRA, Zhang et al. 2023 (arXiv:2303.10512): importance-pruned SVD-form update."""

    presets = {"paper": {"init_like_lora": False}}  # E = 0, A and B ~ N(0, 0.02²) (§3.1)
    peftlab_only = ("init_like_lora",)

    init_r: int = opt(12, "initial rank r0 of every module (the paper suggests 1.5 x target_r); the update is "
                          "scaled by lora_alpha / init_r", check=at_least(1))
    tinit: int | None = opt(None, "steps before pruning starts; default 15% of total_step", check=at_least(0))
    tfinal: int | None = opt(None, "final steps with the pattern frozen; default 35% of total_step "
                                   "(so the budget shrinks over half of training, as the authors advise); 0 = none, "
                                   "as PEFT's default", check=at_least(0))
    deltaT: int = opt(1, "mask every deltaT steps while the budget shrinks", check=at_least(1))
    orth_reg_weight: float = opt(0.1, "γ of the orthogonality regularizer (paper/official 0.1; PEFT's 0.5)",
                                 check=at_least(0))
    rank_pattern: dict[str, list[bool]] = opt({}, "live triplets per module ('<module>.lora_E': [bool] * init_r); "
                                                  "written on save, read on load")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.target_r <= self.init_r:
            raise ValueError(f"adalora target_r={self.target_r} must be between 1 and init_r={self.init_r}")
        if self.total_step is None:
            return
        tinit = self.tinit if self.tinit is not None else int(0.15 * self.total_step)
        tfinal = self.tfinal if self.tfinal is not None else max(1, int(0.35 * self.total_step))
        object.__setattr__(self, "tinit", tinit)
        object.__setattr__(self, "tfinal", tfinal)
        if tinit + tfinal >= self.total_step:
            raise ValueError(f"adalora schedule leaves no budget phase: tinit={tinit} + tfinal={tfinal} must be "
                             f"< total_step={self.total_step}")

    @classmethod
    def sized(cls, size: int) -> dict[str, Any]:
        return {"target_r": size, "init_r": max(size, round(1.5 * size))}  # the paper's r0 = 1.5 x target

    def peft_fields(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        fields = super().peft_fields(layers)
        fields["rank_pattern"] = {f"{name}.lora_E": layer.active.tolist() for name, layer in layers.items()}
        return {**fields, "bias": "none"}
