"""LoRA (Hu et al. 2021, arXiv:2106.09685) with optional rsLoRA scaling (arXiv:2312.03732).

    y = base(x) + s · (drop(x) Aᵀ) Bᵀ,   A: (r, d_in), B: (d_out, r),   s = α/r  (α/√r with rsLoRA)

A starts as nn.Linear's default (kaiming-uniform, a=√5), B at zero, so the wrapped model equals
the base at step 0 while B still gets a gradient (paper §4.1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import AdapterConfig, AdapterLayer, LowRankLayer, opt, pattern_value
from .registry import register


class LoRALinear(LowRankLayer):
    def __init__(self, base_layer: nn.Module, config: "LoRAConfig", name: str):
        super().__init__(base_layer)
        self.r = config.rank_for(name)
        self.alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        self.scale = config.scale(self.r, self.alpha)
        device = next(base_layer.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device))  # (d_out, r)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.reset_parameters(config.init_lora_weights)

    @torch.no_grad()
    def reset_parameters(self, init: bool | str) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:  # both non-zero: tests only (PEFT's init_lora_weights=False)
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            self.lora_B.zero_()

    def branch(self, x: Tensor) -> Tensor:
        h = self.dropout(x.to(self.lora_A.dtype))             # (..., d_in)
        return (h @ self.lora_A.t() @ self.lora_B.t()) * self.scale  # (..., r) -> (..., d_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}"


@register("lora", layer=LoRALinear, peft_type="LORA")
@dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """LoRA, Hu et al. 2021 (arXiv:2106.09685), §4.1; defaults follow common practice (r=8, α=16)."""

    r: int = opt(8, "rank of the update")
    lora_alpha: float = opt(16.0, "the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)")
    lora_dropout: float = opt(0.0, "dropout on the adapter branch's input only; the base path never sees it")
    use_rslora: bool = opt(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    init_lora_weights: bool | str = opt(
        True, "True: A kaiming-uniform, B zero (identity at init); 'gaussian': A ~ N(0, 1/r²); False: tests only"
    )
    rank_pattern: dict[str, int] = opt({}, "per-module rank overrides: {name or suffix regex: r}")
    alpha_pattern: dict[str, float] = opt({}, "per-module alpha overrides: {name or suffix regex: alpha}")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer >= 1, got {self.r!r}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"rank_pattern values must be integers >= 0, got {bad}")

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def scale(self, r: int, alpha: float) -> float:
        if r == 0:
            return 0.0
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def peft_fields(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        return {**super().peft_fields(layers), "bias": "none"}

    @classmethod
    def from_peft_fields(cls, saved: dict[str, Any]) -> dict[str, Any]:
        kwargs = super().from_peft_fields(saved)
        # the weights come from the file, so an init recipe such as "eva" or "pissa" is only history
        if kwargs.get("init_lora_weights") not in (True, False, "gaussian"):
            kwargs["init_lora_weights"] = True
        return kwargs
