"""The layer every method's wrapper extends: y = base(x) + branch(x), the base frozen and
untouched except by merge; and the B·A factor pair that the LoRA family shares.
"""
from __future__ import annotations

import math
from typing import Any

import regex
import torch
from torch import Tensor, nn

from .. import kernels, quant

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix of a module's adapter tensors in its files


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fullmatch(pattern: str, name: str) -> bool:
    """Whether a regex (from a config, perhaps from a file) matches all of a module name, in bounded
    time: a pattern with nested quantifiers that backtracks for seconds is an error, not a hang."""
    try:
        return regex.fullmatch(pattern, name, timeout=0.5) is not None
    except TimeoutError:
        raise ValueError(f"the pattern {pattern!r} takes too long to match module names (nested quantifiers?); "
                         "use module-name suffixes or a simpler regex") from None
    except regex.error as e:
        raise ValueError(f"{pattern!r} is not a valid regular expression ({e})") from None


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a full name or a dotted suffix of it."""
    for key, value in patterns.items():
        if fullmatch(rf"(.*\.)?({key})", module_name):
            return value
    return default


def check_rank(rank: int, base_layer: nn.Module, setting: str, name: str) -> None:
    """A low-rank update of `rank` fits the layer: no more than its full rank min(d_in, d_out)
    (checked before anything is allocated)."""
    d_in, d_out = quant.base_shape(base_layer)
    if rank > min(d_in, d_out):
        raise ValueError(f"{setting}={rank} is above the full rank of {name} ({d_out} x {d_in}: at most "
                         f"{min(d_in, d_out)}); an update of that rank cannot exist. Use {setting} <= {min(d_in, d_out)} "
                         "(rank_pattern sets it per module)")


class AdapterLayer(nn.Module):
    """Wraps one frozen base module: y = base(x) + branch(x), with branch(x) == x @ delta_weight().T.

    The base may be nn.Linear, GPT-2 Conv1D or a bitsandbytes Linear4bit; adapter math is always
    in the canonical (d_out, d_in) orientation and only merge touches the stored base weight.
    A method implements `branch`, `delta_weight`, `adapter_parameters` and the PEFT key table
    (`peft_state` / `load_peft_state`).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        quant.keep_exact_cpu_path(base_layer)
        self.in_features, self.out_features = quant.base_shape(base_layer)
        self.merged = False
        self.enabled = True
        self.fusion: kernels.Fusion | None = None  # set by wrap when the fused kernel can run this layer

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this method can wrap `module` (Linear, GPT-2 Conv1D and 4-bit Linear by default)."""
        return quant.is_adaptable(module)

    def is_active(self) -> bool:
        """False for a module whose update was assigned rank 0: it is left out of saved adapters."""
        return True

    # --- implemented by each method ---
    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def low_rank_product(self) -> kernels.LowRankProduct | None:
        """The update as s·(drop(x) Aᵀ)Bᵀ for the fused kernel; None: this layer (now) needs `branch`."""
        return None

    def delta_weight(self) -> Tensor:
        """The update as a float32 (d_out, d_in) matrix."""
        raise NotImplementedError

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def peft_state(self) -> dict[str, Tensor]:
        """Tensors to save, keyed by their PEFT suffix (e.g. 'lora_A.weight')."""
        raise NotImplementedError

    def load_peft_state(self, state: dict[str, Tensor]) -> None:
        raise NotImplementedError

    # --- shared ---
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x, *args, **kwargs)
        if self.fusion is not None and not args and not kwargs:
            y = self.fusion(self, x)
            if y is not None:
                return y
        y = self.base_layer(x, *args, **kwargs)
        return y + self.branch(x).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta, computed in float32 and cast once; raises rather than write inf/nan."""
        if self.merged:
            raise RuntimeError("adapter is already merged into the base weight; call unmerge() first")
        if quant.is_4bit(self.base_layer):
            raise RuntimeError(
                "cannot merge in place into a 4-bit base: re-quantizing would lose the update's "
                "precision. Use peftlab.merge(model), which merges onto the dequantized base"
            )
        merged = quant.base_weight(self.base_layer) + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("merging would produce non-finite weights; the adapter holds inf/nan")
        quant.set_base_weight(self.base_layer, merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged; nothing to unmerge")
        quant.set_base_weight(self.base_layer, quant.base_weight(self.base_layer) - self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """(A, B) in float32 with B @ A ≈ delta_weight(), for export as a plain LoRA.

        Low-rank methods return their exact factors; this default is the truncated SVD, which
        needs a `rank` (the best rank-r approximation in Frobenius norm, Eckart–Young).
        """
        if rank is None:
            raise ValueError(f"{type(self).__name__} is not low-rank; export it with an explicit rank")
        u, s, vh = torch.linalg.svd(self.delta_weight(), full_matrices=False)
        root = s[:rank].sqrt()
        return root[:, None] * vh[:rank], u[:, :rank] * root  # (rank, d_in), (d_out, rank)

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        """A plain module computing base + adapter; a 4-bit base becomes the dequantized module it
        replaced (nn.Linear, or GPT-2's Conv1D)."""
        if quant.is_4bit(self.base_layer):
            return quant.dequantized_module(self.base_layer, self.delta_weight())
        if not self.merged:
            self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


class LowRankLayer(AdapterLayer):
    """The B·A factor pair that LoRA-family layers share: PEFT's key names and exact factors.

    A (r, d_in) starts as nn.Linear's default (kaiming-uniform, a=√5) and B (d_out, r) at zero, so
    the wrapped model equals the base at step 0 while B still gets a gradient (LoRA §4.1).
    """

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout: float = 0.0):
        super().__init__(base_layer)
        device = next(base_layer.parameters()).device
        self.r, self.scale = r, scale
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def low_rank_product(self) -> kernels.LowRankProduct | None:
        return kernels.LowRankProduct(self.lora_A, self.lora_B, self.scale, kernels.dropout_p(self.dropout))

    def delta_weight(self) -> Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (d_out, d_in)

    def lora_factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        if rank is not None and rank < self.lora_A.shape[0]:
            return super().lora_factors(rank)
        return self.lora_A.detach().float() * self.scale, self.lora_B.detach().float()

    def peft_state(self) -> dict[str, Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor]) -> None:
        self.lora_A.copy_(state["lora_A.weight"])
        self.lora_B.copy_(state["lora_B.weight"])
