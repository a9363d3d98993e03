"""Layers whose update costs as much as the base product (RandLoRA's full-rank update, SaRA's
sparse one): ΔW is folded into the base weight for one matmul per forward, rebuilt in backward
instead of kept, and the dense ∂L/∂W is mapped onto the method's own parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import quant
from .layer import AdapterLayer


class FoldedUpdate(torch.autograd.Function):
    """y = base_op(x, W0 + ΔW(params)) in one product; backward rebuilds the weight instead of
    keeping it, and maps the transient dense ∂L/∂W onto the method's parameters."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "FoldedLayer", *params: Tensor) -> Tensor:
        ctx.layer = layer
        weight = layer.live_weight(x.dtype, *params)
        ctx.weight = weight if layer.keep_weight else None
        ctx.save_for_backward(x, *params)
        return layer.base_op(x, weight)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, *params = ctx.saved_tensors
        layer = ctx.layer
        weight = ctx.weight if ctx.weight is not None else layer.live_weight(x.dtype, *params)
        ctx.weight = None
        grad_x, grad_w = layer.base_grads(x, weight, grad_out, ctx.needs_input_grad[0])
        return (grad_x, None, *layer.param_grads(grad_w, *params))


class FoldedLayer(AdapterLayer):
    """For full-rank and sparse updates, whose ΔW costs as much as the base product: the update is
    folded into the base weight for each forward (W0 + ΔW, one matmul), in the base module's own
    storage layout, and gradients come from the dense ∂L/∂W of that product (the SaRA paper's sparse update, arXiv:2409.06633 §3.2)."""

    keep_weight = False  # True: keep W0 + ΔW from forward for backward instead of rebuilding it
    dropout: nn.Module | None = None  # dropout on the update's input needs the separate branch

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not self.enabled:
            return self.base_layer(x)
        if self.dropout is None:
            return FoldedUpdate.apply(x, self, *self.adapter_parameters().values())
        return super().forward(x)

    def storage_weight(self) -> Tensor:
        """W0 in the base module's storage layout (dequantized for a 4-bit base)."""
        return quant.dequantize(self.base_layer) if quant.is_4bit(self.base_layer) else self.base_layer.weight

    def live_weight(self, dtype: torch.dtype, *params: Tensor) -> Tensor:
        """W0 + ΔW(params) in storage layout."""
        raise NotImplementedError

    def param_grads(self, grad_weight: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        """∂L/∂params from ∂L/∂W (storage layout)."""
        raise NotImplementedError

    def base_op(self, x: Tensor, weight: Tensor) -> Tensor:
        base, bias = self.base_layer, self.base_layer.bias
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, bias)
        if isinstance(base, Conv1D):  # y = x W + b with W stored (d_in, d_out), as Conv1D computes it
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    def base_grads(self, x: Tensor, weight: Tensor, grad_out: Tensor, need_x: bool) -> tuple[Tensor | None, Tensor]:
        base = self.base_layer
        if isinstance(base, nn.Conv2d):
            args = (base.stride, base.padding, base.dilation, base.groups)
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad_out, *args) if need_x else None
            return grad_x, torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, *args)
        g, h = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if isinstance(base, Conv1D):
            return (grad_out @ weight.t() if need_x else None), h.t() @ g   # weight (d_in, d_out)
        return (grad_out @ weight if need_x else None), g.t() @ h           # weight (d_out, d_in)

    def to_storage(self, delta: Tensor) -> Tensor:
        """A canonical (d_out, d_in) matrix in the base weight's storage layout."""
        if isinstance(self.base_layer, Conv1D):
            return delta.t()
        return delta.reshape(self.storage_weight().shape)

    def to_canonical(self, weight: Tensor) -> Tensor:
        if isinstance(self.base_layer, Conv1D):
            return weight.t()
        return weight.reshape(weight.shape[0], -1)
