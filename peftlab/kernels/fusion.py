"""Which layers run the fused kernel, and which of them share one input.

A wrapped model gets one `Fusion`. Sibling projections named like a shared-input set (q/k/v,
gate/up) form a group, fixed at wrap time so that every run of a model computes alike (exact
resume). The first member called computes every member's output in one `FusedLoRA` node; the
others pick theirs up when they are called with that very tensor. A member called with another
tensor (cross-attention) dissolves its group, so the grouping never changes what a layer computes;
torch.compile tracing and a layer that needs its eager branch just now run eagerly.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import quant
from .lora import Adapter, FusedLoRA, dropout_keep_mask

log = logging.getLogger("peftlab")


class LowRankProduct(NamedTuple):
    """What a LoRA-family layer adds to its base: scale · (drop(x) aᵀ) bᵀ; `row_scale` scales the
    rows of the a/b gradients only (ALLoRA)."""

    a: Tensor             # (r, d_in)
    b: Tensor             # (d_out, r)
    scale: float
    dropout: float = 0.0
    row_scale: Tensor | None = None


def dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def blocker(layer: nn.Module) -> str | None:
    """Why the fused kernel cannot stand in for this layer's base module, or None if it can."""
    base = layer.base_layer
    if base._forward_hooks or base._forward_pre_hooks:
        return "its base module has forward hooks, which the fused kernel would skip"
    if quant.is_4bit(base):
        return None
    if type(base) not in (nn.Linear, Conv1D):
        return f"its base module is a {type(base).__name__} (fused: nn.Linear, Conv1D, bitsandbytes Linear4bit)"
    return None


# projections that read the same input, by the names architectures give them (sibling modules)
SHARED_INPUT_NAMES = (
    ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),   # Llama, Mistral, Qwen, OPT, BART
    ("query", "key", "value"),                                  # BERT, RoBERTa, ViT
    ("q_lin", "k_lin", "v_lin"),                                # DistilBERT
    ("wq", "wk", "wv"), ("w1", "w3"),                           # Meta Llama, Mixtral experts
    ("q", "k", "v"),                                            # T5
)


class Fusion:
    """Runs a model's fused layers; members of a shared-input group are computed together."""

    def __init__(self, groups: list[tuple[nn.Module, ...]]) -> None:
        self.groups = {member: group for group in groups for member in group}
        self.pending: dict[nn.Module, tuple[Tensor, Tensor]] = {}  # outputs computed early by a group member

    def __call__(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        """The layer's output through the fused kernel, or None when it must run eagerly."""
        if torch.compiler.is_compiling():   # traced layer by layer: the pending outputs are eager-only state
            return self._run_traced(layer, x)
        waiting = self.pending.pop(layer, None)
        if waiting is not None:
            if waiting[0] is x:
                return waiting[1]
            self._dissolve(layer)   # this member was called with another tensor: not a shared input here
        group = self.groups.get(layer, (layer,))
        outputs = self._run(group, x)
        if outputs[group.index(layer)] is None:
            return None
        for member, out in zip(group, outputs):
            if member is not layer:
                self.pending[member] = (x, out)
        return outputs[group.index(layer)]

    def drop(self, layer: nn.Module) -> None:
        """Forget a layer that leaves the model (EVA unwraps rank-0 layers); its group keeps the rest."""
        group = tuple(m for m in self.groups.pop(layer, ()) if m is not layer)
        self.pending.pop(layer, None)
        for member in group:
            self.groups[member] = group
            if len(group) == 1:
                del self.groups[member]
        layer.fusion = None

    def _dissolve(self, layer: nn.Module) -> None:
        group = self.groups.get(layer, ())
        for member in group:
            self.groups.pop(member)
            self.pending.pop(member, None)
        log.info("peftlab: %d projections named like a shared-input group read different inputs; "
                 "they run one by one", len(group))

    def _run(self, group: tuple[nn.Module, ...], x: Tensor) -> tuple[Tensor | None, ...]:
        """Every member's output; None for a member that needs its eager branch now (the others then
        run one by one)."""
        products = [m.low_rank_product() for m in group]
        if len(group) > 1 and any(p is None for p in products):
            return tuple(p and self._run((m,), x)[0] for m, p in zip(group, products))
        if products[0] is None:
            return (None,)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        p = products[0].dropout if group[0].training else 0.0
        if len(group) == 1 and products[0].row_scale is None and use_triton(x):
            from .triton_lora import TritonLoRA

            with torch.autocast(device, enabled=False):
                return (TritonLoRA.apply(x.to(dtype), group[0].base_layer, products[0].a, products[0].b,
                                         products[0].scale, p),)
        keep, keep_scale = dropout_keep_mask(x.shape, p, x.device) if p > 0 else (None, 1.0)
        adapters = tuple(Adapter(m.base_layer, prod.scale) for m, prod in zip(group, products))
        factors = [t for prod in products for t in (prod.a, prod.b)]
        with torch.autocast(device, enabled=False):
            return FusedLoRA.apply(x.to(dtype), keep, keep_scale, adapters,
                                   tuple(prod.row_scale for prod in products), *factors)


    def _run_traced(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        """One layer as the opaque `peftlab::lora_linear` op (a 4-bit base: FusedLoRA, traced)."""
        base, product = layer.base_layer, layer.low_rank_product()
        if product is None:
            return None
        if quant.is_4bit(base):
            return self._run((layer,), x)[0]
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        p = product.dropout if layer.training else 0.0
        with torch.autocast(device, enabled=False):
            return torch.ops.peftlab.lora_linear(x.to(dtype), base.weight, base.bias, product.a, product.b,
                                                 product.row_scale, product.scale, p, isinstance(base, Conv1D))[0]


def use_triton(x: Tensor) -> bool:
    """The Triton kernels run on CUDA tensors when triton is installed (peftlab[kernels])."""
    return x.is_cuda and importlib.util.find_spec("triton") is not None


def shared_input_groups(layers: dict[str, nn.Module]) -> list[tuple[nn.Module, ...]]:
    """Sibling layers named like q/k/v or gate/up, with the same input width and dropout."""
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = layer
    groups = []
    for siblings in by_parent.values():
        for names in SHARED_INPUT_NAMES:
            members = tuple(siblings[n] for n in names if n in siblings)
            alike = {(m.in_features, m.low_rank_product().dropout, type(m)) for m in members}
            if len(members) > 1 and len(alike) == 1:
                groups.append(members)
    return groups


def attach(layers: dict[str, nn.Module]) -> None:
    """Give every LoRA-family layer the model's Fusion; one log line names the layers that cannot use it."""
    fusable, blocked = {}, {}
    for name, layer in layers.items():
        if layer.low_rank_product() is None:   # randlora, sara: their update is folded, not low-rank
            continue
        reason = blocker(layer)
        if reason is None:
            fusable[name] = layer
        else:
            blocked.setdefault(reason, []).append(name)
    fusion = Fusion(shared_input_groups(fusable))
    for layer in fusable.values():
        layer.fusion = fusion
    for reason, names in blocked.items():
        log.warning("peftlab: %d layer(s) use the eager path, not the fused kernel: %s (e.g. %s)",
                    len(names), reason, names[0])
