"""A weighted combination of named adapters into a new LoRA adapter, with the semantics of PEFT's
`add_weighted_adapter` for its three exact-or-simple modes (ΔWᵢ includes each adapter's scale):

    cat:     A = [w₁A₁; w₂A₂; …], B = [B₁ B₂ …]      ΔW = Σ wᵢ ΔWᵢ exactly, rank Σ rᵢ
    svd:     ΔW = Σ wᵢ ΔWᵢ, truncated to rank k       the best rank-k approximation (Eckart–Young)
    linear:  A = Σ ±√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ     mixes the factors themselves (cross terms
                                                      included), LoRA layers of one rank only

The new adapter stores its update at scale 1 (lora_alpha = r per module), as PEFT's does.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .inject import adapters_of, check_adapter_name, state_of, wrap
from .layer import AdapterLayer, LowRankLayer
from .registry import get_config

COMBINATIONS = ("cat", "linear", "svd")


def has_exact_factors(layer: AdapterLayer) -> bool:
    """Whether the layer's update is a product B·A it can hand over as is (the LoRA family, AdaLoRA's
    and IncreLoRA's P·Λ·Q), rather than a folded full-rank or sparse ΔW."""
    return type(layer).lora_factors is not AdapterLayer.lora_factors


@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None) -> None:
    """Add `adapter_name`, a LoRA adapter computing the weighted combination of `adapters` (module
    docstring). Weights may be negative. The active adapter stays what it was."""
    check_adapter_name(adapter_name)
    if adapter_name in adapters_of(model).states:
        raise ValueError(f"this model already has an adapter named {adapter_name!r}; choose another adapter_name")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type={combination_type!r}; peftlab combines with {', '.join(COMBINATIONS)}")
    if not adapters or len(weights) != len(adapters):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if svd_rank is not None and svd_rank < 1:
        raise ValueError(f"svd_rank must be >= 1, got {svd_rank}")
    states = [state_of(model, name) for name in adapters]
    _check_methods(states, combination_type, svd_rank)
    saving = [s for s in states if s.trained]
    if len(saving) > 1:
        raise ValueError(f"adapters {[s.name for s in saving]} each train their own modules_to_save, which cannot be "
                         "combined; combine adapters of which at most one has modules_to_save")

    targets = list(dict.fromkeys(name for s in states for name in s.layers))
    rank = svd_rank or max(_rank(layer) for s in states for layer in s.layers.values())
    factors = {}
    for target in targets:
        sources = [(s.layers[target], w) for s, w in zip(states, weights) if target in s.layers]
        a, b = {"cat": _cat, "linear": _linear, "svd": _svd}[combination_type](sources, rank, svd_clamp)
        if a.shape[0]:
            factors[target] = (a, b)
    if not factors:
        raise ValueError(f"the combination of {list(adapters)} is zero in every module; there is nothing to add")

    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    top = max(ranks.values())
    config = get_config("lora", r=top, lora_alpha=top, lora_dropout=0.0, target_modules=tuple(factors),
                        rank_pattern=ranks, alpha_pattern=dict(ranks),
                        modules_to_save=tuple(saving[0].trained) if saving else ())
    wrap(model, config, adapter_name=adapter_name)
    new = state_of(model, adapter_name)
    for name, (a, b) in factors.items():
        new.layers[name].lora_A.copy_(a)
        new.layers[name].lora_B.copy_(b)
    for name, module in new.trained.items():
        module.load_state_dict(saving[0].trained[name].state_dict())


def _check_methods(states: list, combination_type: str, svd_rank: int | None) -> None:
    for state in states:
        layer = next(iter(state.layers.values()))
        if combination_type == "linear" and not isinstance(layer, LowRankLayer):
            raise ValueError(f"combination_type='linear' mixes the A and B factors of LoRA layers (lora, evalora, "
                             f"allora); adapter {state.name!r} is {state.method.name}: use 'cat' or 'svd'")
        if combination_type == "cat" and not has_exact_factors(layer):
            raise ValueError(f"combination_type='cat' concatenates low-rank factors; adapter {state.name!r} is "
                             f"{state.method.name}, whose update has none: use 'svd' with an svd_rank")
        if combination_type == "svd" and svd_rank is None and not has_exact_factors(layer):
            raise ValueError(f"adapter {state.name!r} is {state.method.name}, whose update has no rank of its own; "
                             "pass svd_rank= (the rank of the combined adapter)")


def _rank(layer: AdapterLayer) -> int:
    return layer.lora_factors()[0].shape[0] if has_exact_factors(layer) else 0


def _cat(sources: list[tuple[AdapterLayer, float]], rank: int, clamp: float | None) -> tuple[Tensor, Tensor]:
    pairs = [(layer.lora_factors(), w) for layer, w in sources]  # A carries the layer's scale
    return torch.cat([a * w for (a, _), w in pairs]), torch.cat([b for (_, b), _ in pairs], dim=1)


def _linear(sources: list[tuple[AdapterLayer, float]], rank: int, clamp: float | None) -> tuple[Tensor, Tensor]:
    ranks = {layer.lora_A.shape[0] for layer, _ in sources}
    if len(ranks) > 1:
        raise ValueError(f"combination_type='linear' needs one rank per module, found ranks {sorted(ranks)}; "
                         "use 'cat' or 'svd'")
    a = b = 0
    for layer, w in sources:
        root = math.sqrt(abs(w * layer.scale))
        sign = 1.0 if w * layer.scale >= 0 else -1.0  # on A alone: on both it would cancel
        a = a + sign * root * layer.lora_A.float()
        b = b + root * layer.lora_B.float()
    return a, b


def _svd(sources: list[tuple[AdapterLayer, float]], rank: int, clamp: float | None) -> tuple[Tensor, Tensor]:
    delta = sum(w * layer.delta_weight() for layer, w in sources)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:  # PEFT's svd_clamp: both factors clipped at a quantile of their entries
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        a, b = a.clamp(-high, high), b.clamp(-high, high)
    return a, b
