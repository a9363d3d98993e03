"""The SVD-shaped update that AdaLoRA and IncreLoRA share (AdaLoRA, arXiv:2303.10512, eq. 3):

    ΔW = c · P Λ Q = c · B (A ⊙ E),   A: (rows, d_in), E: (rows, 1), B: (d_out, rows)

plus what else the two methods share: the settings of their triplets and importance averages,
the orthogonality regularizer on P and Q, and the sensitivity moving averages that score a
parameter's importance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..settings import Check, above, at_least, opt, within
from .config import ScheduledConfig
from .layer import AdapterLayer

_OPEN_UNIT = Check(lambda v: 0 < v < 1, "in (0, 1)")


@dataclass(frozen=True, kw_only=True)
class SVDConfig(ScheduledConfig):
    """The settings AdaLoRA and IncreLoRA share."""

    target_r: int = opt(8, "average rank of the final global budget (total = target_r x modules)", check=at_least(1))
    lora_alpha: float = opt(16.0, "numerator of the update's scale; the update starts training like a LoRA of this "
                                  "alpha and r = target_r", check=above(0))
    lora_dropout: float = opt(0.0, "dropout on the adapter branch's input", check=within(0, 1))
    beta1: float = opt(0.85, "EMA factor of the importance (Ī)", check=_OPEN_UNIT)
    beta2: float = opt(0.85, "EMA factor of the importance's uncertainty (Ū)", check=_OPEN_UNIT)
    # the paper (§3.1) starts at E = 0 with random A, B: the first steps then move E alone, along random
    # rank-one directions, and need ~10x LoRA's learning rate. Zeroing B instead keeps ΔW = 0 at init and
    # makes the first phase LoRA's, so LoRA's learning rates carry over (benchmarks/README.md)
    init_like_lora: bool = opt(True, "start as LoRA does (A kaiming, B = 0, E equal and non-zero); "
                                     "False = the paper's start (E = 0, A, B ~ N(0, 0.02²))")

    @classmethod
    def sized(cls, size: int) -> dict[str, Any]:
        return {"target_r": size}

    def final_parameter_count(self, shapes: list[tuple[int, int]]) -> int:
        return sum(self.target_r * (d_out + d_in + 1) for d_out, d_in in shapes)  # A row, B column, E


class SVDLinear(AdapterLayer):
    """Triplets (row i of A, E_i, column i of B); `active` marks the ones that count towards the
    rank, and a masked triplet has E_i == 0. A and B start at N(0, 0.02²), E at 0, as the
    released code does, so the wrapped model equals the base at step 0 (`start_like_lora` is the
    other start with that property)."""

    def __init__(self, base_layer: nn.Module, rows: int, alpha: float, ranknum: float, dropout: float):
        super().__init__(base_layer)
        device = next(base_layer.parameters()).device
        self.lora_A = nn.Parameter(torch.randn(rows, self.in_features, device=device) * 0.02)   # (rows, d_in)
        self.lora_E = nn.Parameter(torch.zeros(rows, 1, device=device))                         # (rows, 1)
        self.lora_B = nn.Parameter(torch.randn(self.out_features, rows, device=device) * 0.02)  # (d_out, rows)
        self.register_buffer("active", torch.ones(rows, dtype=torch.bool, device=device), persistent=False)
        self.alpha, self.ranknum = alpha, float(ranknum)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / (self.ranknum + 1e-5)

    @property
    def rank(self) -> int:
        return int(self.active.sum())

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}

    @torch.no_grad()
    def start_like_lora(self, rows: int, target_r: int) -> None:
        """The first `rows` triplets start as a LoRA update: A kaiming-uniform, B = 0, and one E value
        chosen so that the first AdamW steps (which move B alone) move each triplet as one of LoRA's
        rank-one terms at the same α and r = target_r (c·E = α/target_r); with fewer rows than
        target_r (IncreLoRA's start) E is √(target_r/rows) larger, so the module's first steps still
        change ΔW as much as LoRA's do."""
        nn.init.kaiming_uniform_(self.lora_A[:rows], a=math.sqrt(5))
        self.lora_B[:, :rows] = 0.0
        self.start_value = self.ranknum / target_r * max(1.0, math.sqrt(target_r / rows))
        self.lora_E[:rows] = self.start_value

    def singular_values(self) -> Tensor:
        """E as the forward uses it (a masked AdaLoRA triplet may revive between masks: no mask here)."""
        return self.lora_E

    def low_rank_product(self) -> kernels.LowRankProduct | None:
        return kernels.LowRankProduct(self.lora_A * self.singular_values(), self.lora_B, self.scale,
                                      kernels.dropout_p(self.dropout))

    def branch(self, x: Tensor) -> Tensor:
        h = self.dropout(x.to(self.lora_A.dtype))                          # (..., d_in)
        return (h @ (self.lora_A * self.singular_values()).t() @ self.lora_B.t()) * self.scale

    def delta_weight(self) -> Tensor:
        return (self.lora_B.float() @ (self.lora_A.float() * self.singular_values().float())) * self.scale

    @torch.no_grad()
    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        e = self.singular_values().float()
        keep = e[:, 0] != 0  # exact: a zero singular value contributes nothing
        if rank is not None and rank < int(keep.sum()):
            return super().lora_factors(rank)
        return (self.lora_A.float() * e)[keep] * self.scale, self.lora_B.float()[:, keep]

    @torch.no_grad()
    def mask(self, active: Tensor) -> None:
        """Keep the triplets in `active`; the others get a zero singular value (A, B untouched)."""
        self.active.copy_(active)
        self.lora_E[~active] = 0.0

    def saved_rows(self) -> Tensor:
        """The rows a saved adapter holds (AdaLoRA: the live triplets)."""
        return self.active

    def peft_state(self) -> dict[str, Tensor]:
        # PEFT's AdaLoRA keys carry no ".weight"; files hold only the saved rows, in order
        rows = self.saved_rows()
        return {"lora_A": self.lora_A.detach()[rows], "lora_E": self.singular_values().detach()[rows],
                "lora_B": self.lora_B.detach()[:, rows]}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor]) -> None:
        rows = self.saved_rows()
        self.lora_E.zero_()
        self.lora_A[rows], self.lora_B[:, rows] = state["lora_A"], state["lora_B"]
        self.lora_E[rows] = state["lora_E"]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}/{self.lora_A.shape[0]}, scale={self.scale:g}"


def orthogonality_penalty(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """R = mean over all A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F: unsquared and averaged, as the
    released AdaLoRA code and PEFT do (the paper's eq. 4 squares and sums)."""
    terms = []
    for a, b in pairs:
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        terms += [torch.linalg.matrix_norm(a @ a.t() - eye), torch.linalg.matrix_norm(b.t() @ b - eye)]
    return torch.stack(terms).mean()


@torch.no_grad()
def update_sensitivity(ema: dict[str, Tensor], param: Tensor, beta1: float, beta2: float) -> None:
    """Ī ← β1 Ī + (1−β1)|w·g|;  Ū ← β2 Ū + (1−β2)|I − Ī| with the updated Ī (AdaLoRA eq. 5-7)."""
    sensitivity = (param.float() * param.grad.float()).abs()
    ema["I"].mul_(beta1).add_(sensitivity, alpha=1 - beta1)
    ema["U"].mul_(beta2).add_((sensitivity - ema["I"]).abs(), alpha=1 - beta2)
