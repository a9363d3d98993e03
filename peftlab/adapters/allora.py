"""ALLoRA (Huang & Balestriero 2024, arXiv:2410.09692): LoRA without dropout, whose factor
gradients are scaled per output row by an adaptive coefficient

    c_i = 1 / sqrt(‖(s·BA)_i‖₂ + 1/η²)       (row norm of the update, not squared: the paper's listing)

so that rows still at zero escape fast (c = η) and grown rows move carefully. Only ∂L/∂A and
∂L/∂B see c; the gradient passed to the layer below is the plain one. The update keeps LoRA's
α/r output scale s (see ALLoRAConfig.lora_alpha; preset="paper" drops it), and c is computed from
the rows of s·BA, the update the forward adds. Saved and merged as a plain LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..settings import above, opt
from .config import LowRankConfig
from .layer import AdapterLayer, LowRankLayer, check_rank
from .registry import register


def row_coefficients(a: Tensor, b: Tensor, scale: float, inv_eta_sq: float) -> Tensor:
    """c_i for every output row of s·BA, from ρ_i² = b_iᵀ (A Aᵀ) b_i: O(r²(d_in + d_out)), not a dense BA."""
    a, b = a.detach().float(), b.detach().float()
    rho_sq = ((b @ (a @ a.t())) * b).sum(1).clamp_min(0)   # (d_out,)
    return (scale * rho_sq.sqrt() + inv_eta_sq).rsqrt()


class ALLoRABranch(torch.autograd.Function):
    """y = (x Aᵀ) Bᵀ; backward scales the output-gradient columns by c for the A and B gradients only."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, scale: float, inv_eta_sq: float) -> Tensor:
        c = row_coefficients(a, b, scale, inv_eta_sq).to(x.dtype)  # a constant: no gradient flows through c
        ctx.save_for_backward(x, a, b, c)
        return (x @ a.t()) @ b.t()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, a, b, c = ctx.saved_tensors
        grad_x = (grad_out @ b) @ a if ctx.needs_input_grad[0] else None   # unscaled
        g = (grad_out * c).reshape(-1, b.shape[0])                           # (T, d_out), columns scaled
        h = x.reshape(-1, a.shape[1])                                         # (T, d_in)
        grad_b = g.t() @ (h @ a.t())                                          # (d_out, r) = diag(c) Gᵀ X Aᵀ
        grad_a = (g @ b).t() @ h                                              # (r, d_in)  = Bᵀ diag(c) Gᵀ X
        return grad_x, grad_a, grad_b, None, None


class ALLoRALinear(LowRankLayer):
    def __init__(self, base_layer: nn.Module, config: "ALLoRAConfig", name: str):
        check_rank(config.r, base_layer, "r", name)
        super().__init__(base_layer, config.r, config.lora_alpha / config.r)  # no dropout: the method drops it
        self.inv_eta_sq = 1.0 / config.eta ** 2

    def low_rank_product(self) -> kernels.LowRankProduct | None:
        c = row_coefficients(self.lora_A, self.lora_B, self.scale, self.inv_eta_sq)
        return kernels.LowRankProduct(self.lora_A, self.lora_B, self.scale, row_scale=c)

    def branch(self, x: Tensor) -> Tensor:
        return self.scale * ALLoRABranch.apply(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scale,
                                               self.inv_eta_sq)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, eta={self.inv_eta_sq ** -0.5:g}"


@register("allora", layer=ALLoRALinear, peft_type="LORA")
@dataclass(frozen=True, kw_only=True)
class ALLoRAConfig(LowRankConfig):
    """ALLoRA, Huang & Balestriero 2024 (arXiv:2410.09692): adaptive per-row gradient scaling."""

    presets = {"paper": {"lora_alpha": lambda config: float(config.r)}}  # scale 1 (§4)
    peftlab_only = ("eta",)

    # the paper drops α/r (arXiv:2410.09692 §4); under Adam the coefficients c cancel to first order,
    # so without it the update moves at r/α of LoRA's speed: kept, with LoRA's default, as a drop-in
    lora_alpha: float = opt(16.0, "the update is scaled by lora_alpha / r, as LoRA's (lora_alpha = r: the paper's scale 1)",
                            check=above(0))
    eta: float = opt(2.0, "the row coefficient's ceiling η (the paper's listing uses η² = 4)", check=above(0))

    def peft_fields(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        # a plain PEFT LoRA without dropout
        return {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
                "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}

    @classmethod
    def peft_keys(cls) -> set[str]:
        return {"r", "lora_alpha", "lora_dropout", "rank_pattern"}

    @classmethod
    def from_peft_fields(cls, saved: dict[str, Any]) -> dict[str, Any]:
        if saved.get("lora_dropout", 0.0) or saved.get("rank_pattern"):
            raise ValueError("an ALLoRA adapter is a plain LoRA without dropout, of one rank; this file is not one "
                             "(load it as 'lora')")
        return {"r": saved["r"], "lora_alpha": saved["lora_alpha"]}
