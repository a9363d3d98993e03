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

from ..settings import Check, above, one_of, opt, within
from .config import LowRankConfig
from .layer import AdapterLayer, LowRankLayer, check_rank, pattern_value
from .registry import register


class LoRALinear(LowRankLayer):
    def __init__(self, base_layer: nn.Module, config: "LoRAConfig", name: str):
        r, alpha = self.rows(config, name, base_layer), pattern_value(config.alpha_pattern, name, config.lora_alpha)
        super().__init__(base_layer, r, config.scale(r, alpha), config.lora_dropout)
        self.alpha = alpha
        if config.init_lora_weights == "gaussian":
            with torch.no_grad():
                nn.init.normal_(self.lora_A, std=1 / self.r)
        elif config.init_lora_weights is False:  # both non-zero: tests only (PEFT's init_lora_weights=False)
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    @staticmethod
    def rows(config: "LoRAConfig", name: str, base_layer: nn.Module) -> int:
        r = config.rank_for(name)
        check_rank(r, base_layer, "r" if r == config.r else "rank_pattern", name)
        return r

    def branch(self, x: Tensor) -> Tensor:
        h = self.dropout(x.to(self.lora_A.dtype))             # (..., d_in)
        return (h @ self.lora_A.t() @ self.lora_B.t()) * self.scale  # (..., r) -> (..., d_out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}"


_NON_NEGATIVE_INTS = Check(lambda d: all(v >= 0 for v in d.values()), "a mapping of integers >= 0")


@register("lora", layer=LoRALinear, peft_type="LORA")
@dataclass(frozen=True, kw_only=True)
class LoRAConfig(LowRankConfig):
    """LoRA, Hu et al. 2021 (arXiv:2106.09685), §4.1; defaults follow common practice (r=8, α=16)."""

    lora_alpha: float = opt(16.0, "the update is scaled by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)",
                            check=above(0))
    lora_dropout: float = opt(0.0, "dropout on the adapter branch's input only; the base path never sees it",
                              check=within(0, 1))
    use_rslora: bool = opt(False, "rank-stabilised scaling lora_alpha / sqrt(r)")
    init_lora_weights: bool | str = opt(
        True, "True: A kaiming-uniform, B zero (identity at init); 'gaussian': A ~ N(0, 1/r²); False: tests only",
        check=one_of(True, False, "gaussian"),
    )
    rank_pattern: dict[str, int] = opt({}, "per-module rank overrides: {name or suffix regex: r}",
                                       check=_NON_NEGATIVE_INTS)
    alpha_pattern: dict[str, float] = opt({}, "per-module alpha overrides: {name or suffix regex: alpha}")

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
