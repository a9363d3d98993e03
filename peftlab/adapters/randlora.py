"""RandLoRA (Albert et al., ICLR 2025, arXiv:2502.00987): a full-rank update from fixed random
bases, of which only two diagonal scalings are trained.

    ΔW_(D×d) = s · B̃ Ã,   Ã[k·n+b, j] = λ[k,b] · A[k,j] · γ[b,j],   B̃[:, b·r+k] = B[:, b, k]
    d = min(d_in, d_out), D = max(d_in, d_out), n = ⌈d/r⌉ bases, s = α / r   (PEFT's conventions)

Trainable per layer: λ (r, n) and γ (n, d). The bases A (r, d*) and B (D*, n*, r) are generated
once per model from a seed (fp32 on the CPU), shared by every layer as slices, never saved:
loading regenerates them and checks a checksum. With n·r >= d the update can be full rank.

Without dropout the update is folded into the base product (one matmul with W0 + ΔW) and the
backward saves only x, λ and γ: ΔW is rebuilt, the dense ∂L/∂ΔW is mapped onto λ and γ and
dropped. With dropout the branch runs as PEFT does, through the two skinny products.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from ..settings import above, opt, within
from .config import LowRankConfig
from .controller import Controller
from .folded import FoldedLayer
from .layer import PEFT_PREFIX, AdapterLayer
from .registry import register


class RandomBases(nn.Module):
    """The shared random bases of one model: A (r, 1, d*) and B (D*, n*, r), unit-std uniform.

    One instance is a child of every RandLoRA layer, so `.to()` moves a single copy and the
    buffers (non-persistent) never reach a state dict.
    """

    def __init__(self, r: int, d_small: int, d_large: int, seed: int):
        super().__init__()
        self.r, self.d_small, self.d_large, self.seed = r, d_small, d_large, seed
        self.count = math.ceil(d_small / r)
        generator = torch.Generator("cpu").manual_seed(seed)
        a = torch.empty(r, 1, d_small)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        parts = [nn.init.kaiming_uniform_(torch.empty(d_large, 1, r), a=math.sqrt(5), generator=generator)
                 for _ in range(self.count)]
        b = torch.cat(parts, dim=1)
        self.register_buffer("A", a / a.std(), persistent=False)
        self.register_buffer("B", b / b.std(), persistent=False)

    def checksum(self) -> str:
        digest = hashlib.sha256()
        for t in (self.A, self.B):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


class ScaleBases(torch.autograd.Function):
    """Ã = λ[:, :, None] · A · γ[None]: saves only A (a view of the shared buffer), λ and γ ."""

    @staticmethod
    def forward(ctx, a: Tensor, lam: Tensor, gam: Tensor) -> Tensor:
        ctx.save_for_backward(a, lam, gam)
        return lam[:, :, None] * a * gam[None]

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, lam, gam = (t.to(grad.dtype) for t in ctx.saved_tensors)
        return None, (grad * a * gam[None]).sum(2), (grad * a * lam[:, :, None]).sum(0)


class RandLoRALinear(FoldedLayer):
    # rebuilding W0 + s·B̃Ã costs d·D·R per layer; keeping it costs d·D floats, about what PEFT's
    # RandLoRA keeps for its own backward (Ã and x·Ãᵀ), so speed wins here (SaRA rebuilds: memory)
    keep_weight = True

    def __init__(self, base_layer: nn.Module, config: "RandLoRAConfig", name: str):
        super().__init__(base_layer)
        self.r = config.r
        self.d, self.D = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        self.n = math.ceil(self.d / self.r)
        device = next(base_layer.parameters()).device
        # PEFT starts at λ = 0, γ = 1/d: the first steps then train only λ's r·n ≈ d entries (a rank-r update
        # until γ moves), and γ, moving lr per step against its own 1/d, grows by x1.4 per step at lr 3e-3 on a
        # 384-wide layer, so ΔW ∝ λγ accelerates with the learning rate (diverged at 3e-3 on the reviews). As the
        # official vision code does, γ starts at 0 (it moves like LoRA's B) and λ at a constant (like LoRA's A),
        # PEFT's 1/d, stored divided by k = √(3/d) so that it moves by as much of itself per step as LoRA's
        # kaiming rows do (an Adam learning-rate multiplier k on λ). init_like_lora=False is PEFT's start, no k
        start = 1 / max(self.n, self.d)
        self.lambda_scale = math.sqrt(3 / self.d) if config.init_like_lora else 1.0
        lam, gam = (start / self.lambda_scale, 0.0) if config.init_like_lora else (0.0, start)
        self.randlora_lambda = nn.Parameter(torch.full((self.r, self.n), lam, device=device))             # (r, n)
        self.randlora_gamma = nn.Parameter(torch.full((self.n, self.d), gam, device=device))              # (n, d)
        self.scale = config.randlora_alpha / config.r
        self.dropout = nn.Dropout(config.randlora_dropout) if config.randlora_dropout else None
        self.bases: RandomBases | None = None  # attached by the controller once every layer's size is known

    def factors(self, lam: Tensor, gam: Tensor, autograd: bool = True) -> tuple[Tensor, Tensor]:
        """(Ã, B̃): Ã (n·r, d) row k·n+b, B̃ (D, n·r) column b·r+k, as PEFT flattens them."""
        a = self.bases.A[:, :, :self.d]                                   # (r, 1, d) view
        lam = lam * self.lambda_scale                                     # the stored λ times k: PEFT's λ
        small = (ScaleBases.apply(a, lam, gam) if autograd else lam[:, :, None] * a * gam[None]).flatten(0, 1)
        large = self.bases.B[:self.D, :self.n, :].reshape(self.D, -1)     # (D, n·r)
        return small, large

    def canonical_delta(self, lam: Tensor, gam: Tensor) -> Tensor:
        small, large = self.factors(lam, gam, autograd=False)
        delta = self.scale * (large @ small)                               # (D, d)
        return delta if self.in_features <= self.out_features else delta.t()  # (d_out, d_in)

    # --- the folded path (no dropout) ---
    def live_weight(self, dtype: torch.dtype, lam: Tensor, gam: Tensor) -> Tensor:
        small, large = self.factors(lam.float(), gam.float(), autograd=False)
        weight = self.to_canonical(self.storage_weight()).to(dtype)             # (d_out, d_in), a view
        if self.in_features <= self.out_features:                               # W + s·B̃Ã in one addmm
            live = torch.addmm(weight, large.to(dtype), small.to(dtype), alpha=self.scale)
        else:
            live = torch.addmm(weight, small.t().to(dtype), large.t().to(dtype), alpha=self.scale)
        return self.to_storage(live)

    def param_grads(self, grad_weight: Tensor, lam: Tensor, gam: Tensor) -> tuple[Tensor, Tensor]:
        grad = self.scale * self.to_canonical(grad_weight).float()           # ∂L/∂(B̃Ã) in (d_out, d_in)
        if self.in_features > self.out_features:
            grad = grad.t()                                                  # (D, d)
        _, large = self.factors(lam, gam, autograd=False)
        grad_small = (large.t() @ grad).view(self.r, self.n, self.d)         # ∂L/∂Ã
        a = self.bases.A[:, :, :self.d]
        return ((grad_small * a * gam[None]).sum(2).mul(self.lambda_scale).to(lam.dtype),
                (grad_small * a * (lam * self.lambda_scale)[:, :, None]).sum(0).to(gam.dtype))

    def branch(self, x: Tensor) -> Tensor:
        h = x.to(self.randlora_lambda.dtype)
        if self.dropout is not None:
            h = self.dropout(h)
        small, large = self.factors(self.randlora_lambda, self.randlora_gamma)
        first, second = (small, large) if self.in_features <= self.out_features else (large.t(), small.t())
        return (h @ first.t() @ second.t()) * self.scale

    def delta_weight(self) -> Tensor:
        return self.canonical_delta(self.randlora_lambda.detach().float(), self.randlora_gamma.detach().float())

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"randlora_lambda": self.randlora_lambda, "randlora_gamma": self.randlora_gamma}

    def peft_state(self) -> dict[str, Tensor]:
        return {"randlora_lambda": self.randlora_lambda.detach() * self.lambda_scale,
                "randlora_gamma": self.randlora_gamma.detach()}

    @torch.no_grad()
    def load_peft_state(self, state: dict[str, Tensor]) -> None:
        self.randlora_lambda.copy_(state["randlora_lambda"] / self.lambda_scale)
        self.randlora_gamma.copy_(state["randlora_gamma"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, bases={self.n}, scale={self.scale:g}"


class RandLoRAController(Controller):
    """Creates the model's bases once every layer exists (their size is the largest layer's)."""

    def __init__(self, model: nn.Module, config: "RandLoRAConfig", layers: dict[str, RandLoRALinear]):
        super().__init__(model, config, layers)
        first = next(iter(layers.values()))
        self.bases = RandomBases(config.r, max(l.d for l in layers.values()), max(l.D for l in layers.values()),
                                 config.projection_prng_key).to(first.randlora_lambda.device)
        # (the memory estimate's fake-tensor trace has shapes only: nothing to check there)
        if (config.bases_checksum and not config.bases_saved and not is_fake(self.bases.A)
                and config.bases_checksum != self.bases.checksum()):
            raise ValueError(
                f"the regenerated random bases do not match the saved checksum ({self.bases.checksum()} vs "
                f"{config.bases_checksum}); this torch version draws different numbers from the seed. Load the "
                "adapter with the torch version that trained it, or export it there with peftlab.io.export_peft")
        for layer in layers.values():
            layer.bases = self.bases

    def shared_state(self) -> dict[str, Tensor]:
        # bases that came from a file (PEFT's RANDLORA) cannot be regenerated from the seed: they travel along
        return {"base_model.randlora_A": self.bases.A, "base_model.randlora_B": self.bases.B} if self.config.bases_saved else {}

    @torch.no_grad()
    def load_shared_state(self, tensors: dict[str, Tensor]) -> set[str]:
        """Take a file's bases (PEFT's model-level `base_model.randlora_A/B`; its per-layer aliases are
        the same tensors and are left unread). PEFT pads them to the largest layer's (out, in); each
        layer reads the same leading block as from our own."""
        if "base_model.randlora_A" not in tensors:
            return set()
        a, b = tensors["base_model.randlora_A"], tensors["base_model.randlora_B"]
        d, big, n = (max(getattr(l, k) for l in self.layers.values()) for k in ("d", "D", "n"))
        if a.shape[0] != self.config.r or a.shape[2] < d or b.shape[0] < big or b.shape[1] < n or b.shape[2] != a.shape[0]:
            raise ValueError(f"the file's RandLoRA bases {tuple(a.shape)} / {tuple(b.shape)} do not cover this model's "
                             f"layers (r={self.config.r}, up to {d} x {big}, {n} bases)")
        device = self.bases.A.device
        self.bases.A, self.bases.B = a.to(device), b.to(device)
        return {k for k in tensors if k in ("base_model.randlora_A", "base_model.randlora_B")
                or k.endswith((".randlora_A", ".randlora_B"))}


@register("randlora", layer=RandLoRALinear, controller=RandLoRAController, peft_type="PEFTLAB_RANDLORA",
          reads=("RANDLORA",))
@dataclass(frozen=True, kw_only=True)
class RandLoRAConfig(LowRankConfig):
    """RandLoRA, Albert et al. 2025 (arXiv:2502.00987): full-rank update from shared random bases."""

    # PEFT's start (λ = 0, γ = 1/d, no λ multiplier) and its α = 20·r, which the author recommends
    presets = {"paper": {"init_like_lora": False, "randlora_alpha": lambda config: 20.0 * config.r}}

    r: int = opt(32, "rank of each random basis; smaller r means more bases and more parameters", check=above(0))
    # PEFT's default 640 (scale 20 at r = 32) moves ΔW ~6x faster per AdamW step than LoRA and diverges
    # at LoRA's learning rates. α = 3.27·r matches LoRA's first steps: γ's n·d entries each move a column
    # of B_b·A (entries of variance r) times λ = 1/d, ‖ΔW step‖ ≈ s·lr·√D (n·r ≈ d); LoRA's d_out·r entries
    # of B move against A rows of norm 1/√3, (α/r)·lr·√(r·D)/√3 = 3.27·lr·√D at α = 16, r = 8. But LoRA's
    # steps then grow as A's rows turn toward the inputs, while RandLoRA's bases stay fixed: at 3.27·r it
    # learned ~3x slower (96% on the generated task, LoRA 99.6%); the default is 3x that, 9.8·r (314 at r = 32)
    randlora_alpha: float | None = opt(None, "the update is scaled by randlora_alpha / r (PEFT's convention); "
                                             "None = 9.8 x r, which trains like LoRA (alpha 16, r 8) at its learning rates",
                                        check=above(0))
    randlora_dropout: float = opt(0.0, "dropout on the branch input (0 keeps the fused single-product path)",
                                  check=within(0, 1))
    projection_prng_key: int = opt(0, "seed of the random bases")
    init_like_lora: bool = opt(True, "γ = 0 and λ = 1/d moving like LoRA's A (a learning-rate multiplier √(3/d) on λ); "
                                     "False = PEFT's and the paper's λ = 0, γ = 1/d")
    bases_checksum: str = opt("", "checksum of the bases (written on save, checked on load)")
    bases_saved: bool = opt(False, "the bases travel in the adapter file (an import of PEFT's RANDLORA) instead of "
                                   "being regenerated from projection_prng_key")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.randlora_alpha is None:
            object.__setattr__(self, "randlora_alpha", round(6 * math.sqrt(8 / 3) * self.r, 3))

    def peft_fields(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        fields = super().peft_fields(layers)
        fields["bases_checksum"] = next(iter(layers.values())).bases.checksum()
        return fields

    @classmethod
    def from_peft_fields(cls, saved: dict[str, Any]) -> dict[str, Any]:
        if saved.get("peft_type") != "RANDLORA":
            return super().from_peft_fields(saved)
        if not saved.get("save_projection", True):  # PEFT regenerates those with its own generator
            raise ValueError("a PEFT RandLoRA adapter saved with save_projection=False holds no bases, and peftlab "
                             "cannot regenerate PEFT's; save it from PEFT with save_projection=True")
        # PEFT's λ and γ as they are: its start, no λ multiplier; the bases come with the file
        return {"r": saved["r"], "randlora_alpha": saved["randlora_alpha"], "init_like_lora": False, "bases_saved": True,
                "randlora_dropout": saved.get("randlora_dropout", 0.0),
                "projection_prng_key": saved.get("projection_prng_key", 0)}

    def final_parameter_count(self, shapes: list[tuple[int, int]]) -> int:
        count = 0
        for d_out, d_in in shapes:
            d = min(d_out, d_in)
            n = math.ceil(d / self.r)
            count += self.r * n + n * d  # λ (r, n) and γ (n, d)
        return count

    def peft_native(self, layers: dict[str, AdapterLayer]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """PEFT's own RANDLORA format, bases included (save_projection=True). PEFT sizes its bases by
        the elementwise maximum of the layers' (out, in); ours (sized by min/max dimension, which
        needs less memory) are zero-padded into that shape, which no layer's slice reaches."""
        if not all(type(l.base_layer) is nn.Linear for l in layers.values()):
            raise ValueError("PEFT's RandLoRA format covers nn.Linear layers only; export this adapter as a "
                             "LoRA instead (peftlab export --as lora --rank N)")
        out_max = max(l.out_features for l in layers.values())
        in_max = max(l.in_features for l in layers.values())
        d_small, d_large = min(out_max, in_max), max(out_max, in_max)
        bases = next(iter(layers.values())).bases
        a = torch.zeros(self.r, 1, d_small)
        a[:, :, :bases.d_small] = bases.A.cpu()
        b = torch.zeros(d_large, math.ceil(d_small / self.r), self.r)
        b[:bases.d_large, :bases.count] = bases.B.cpu()
        tensors = {"base_model.randlora_A": a, "base_model.randlora_B": b}  # PEFT's model-level copy
        for name, layer in layers.items():
            prefix = f"{PEFT_PREFIX}{name}."
            tensors.update({prefix + k: v.cpu() for k, v in layer.peft_state().items()})
            # PEFT 0.21 also expects each layer's alias of the bases (safetensors wants separate storage)
            tensors[prefix + "randlora_A"], tensors[prefix + "randlora_B"] = a.clone(), b.clone()
        config = {"peft_type": "RANDLORA", "r": self.r, "randlora_alpha": self.randlora_alpha,
                  "randlora_dropout": self.randlora_dropout, "projection_prng_key": self.projection_prng_key,
                  "save_projection": True, "target_modules": list(layers), "bias": "none", "init_weights": True}
        return tensors, config


