"""The fused LoRA-family product: base + adapter in one autograd node, with a hand-written backward.

For adapters j that read the same input x (one, or q/k/v, or gate/up):

    y_j = x W_jᵀ + b_j + s_j · (drop(x) A_jᵀ) B_jᵀ          (LoRA, Hu et al. 2021, Eq. 3)

Forward makes one stacked product drop(x) [A_1; A_2; ...]ᵀ, then each base output with its low-rank
term accumulated in place (no separate adapter output, no add). Backward keeps only what it needs:
x (already alive: it is the previous layer's output), the dropout keep-mask as one byte per
element instead of a dropped float copy, the small (tokens, Σr) product, and the factors. A 4-bit
base is dequantized again in backward rather than kept (kernels-qlora spec §1.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import quant

_DROPOUT_BITS = 16  # dropout probabilities are rounded to a multiple of 2⁻¹⁶ (|error| ≤ 7.7e-6)


@dataclass(frozen=True)
class Adapter:
    """One adapted projection as the kernel sees it: its frozen base module and its scale."""

    base: nn.Module
    scale: float


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A bool keep-mask with P(keep) = 1 - p, and the factor 1/(1 - p) that keeps E[drop(x)] = x.

    On CPU, drawing one float per element (nn.Dropout) costs 2 ms for a 1024 x 384 input; here one
    64-bit draw gives four 16-bit uniforms, about 5x cheaper for the same distribution up to the
    rounding of p to 16 bits. Other devices draw floats, which their generators make cheap.
    """
    if device.type != "cpu":
        keep = torch.rand(shape, device=device) >= p
        return keep, 1.0 / (1.0 - p)
    numel = shape.numel()
    levels = round(p * 2 ** _DROPOUT_BITS)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # full 64-bit range
    uniform16 = words.view(torch.int16)[:numel].view(shape)                             # uniform on [-2¹⁵, 2¹⁵)
    keep = uniform16 >= levels - 2 ** (_DROPOUT_BITS - 1)
    return keep, 2 ** _DROPOUT_BITS / (2 ** _DROPOUT_BITS - levels)


def base_matrix(base: nn.Module, dtype: torch.dtype) -> Tensor:
    """The matrix M with base(x) = x M + bias: Wᵀ for Linear (a view), W for GPT-2's Conv1D,
    a freshly dequantized Wᵀ for 4-bit (a temporary, never kept)."""
    if quant.is_4bit(base):
        return quant.dequantize(base).to(dtype).t()
    weight = base.weight.to(dtype)
    return weight if isinstance(base, Conv1D) else weight.t()


class FusedLoRA(torch.autograd.Function):
    """y_j = base_j(x) + s_j (drop(x) A_jᵀ) B_jᵀ for adapters sharing x; see the module docstring.

    `factors` is A_1, B_1, A_2, B_2, ...; `row_scales[j]`, when given, multiplies the rows of the
    A_j/B_j gradients only (ALLoRA's c, Eq. 9); the input gradient never sees it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor | None, keep_scale: float, adapters: tuple[Adapter, ...],
                row_scales: tuple[Tensor | None, ...], *factors: Tensor) -> tuple[Tensor, ...]:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])                                     # (T, d_in)
        h = x2 if keep is None else x2 * keep.view_as(x2)
        a_all = torch.cat(factors[0::2]) if len(adapters) > 1 else factors[0]
        u = h @ a_all.to(dtype).t()                                         # (T, Σr): one stacked product
        outputs, start = [], 0
        for adapter, a, b in zip(adapters, factors[0::2], factors[1::2]):
            base = adapter.base
            bias = None if base.bias is None else base.bias.to(dtype)
            matrix = base_matrix(base, dtype)
            y = x2 @ matrix if bias is None else torch.addmm(bias, x2, matrix)
            del matrix
            y.addmm_(u[:, start:start + a.shape[0]], b.to(dtype).t(), alpha=adapter.scale * keep_scale)
            outputs.append(y.view(*x.shape[:-1], y.shape[-1]))
            start += a.shape[0]
        ctx.adapters, ctx.keep_scale = adapters, keep_scale
        ctx.save_for_backward(x, keep, u, *[c for c in row_scales if c is not None], *factors)
        ctx.has_row_scale = tuple(c is not None for c in row_scales)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        x, keep, u, *rest = ctx.saved_tensors
        n_scales = sum(ctx.has_row_scale)
        scales, factors = iter(rest[:n_scales]), rest[n_scales:]
        x2 = x.reshape(-1, x.shape[-1])
        dtype = grad_outputs[0].dtype
        need_x = ctx.needs_input_grad[0]
        grad_x = None
        grad_u, grad_u_params, grad_factors, start = [], [], [], 0
        for adapter, a, b, grad, scaled in zip(ctx.adapters, factors[0::2], factors[1::2], grad_outputs,
                                               ctx.has_row_scale):
            g = grad.reshape(-1, grad.shape[-1])                            # (T, d_out)
            s = adapter.scale * ctx.keep_scale
            r = a.shape[0]
            u_j = u[:, start:start + r]
            b_c = b.to(dtype)
            if need_x:
                matrix = base_matrix(adapter.base, dtype)                   # dequantized again, not kept
                grad_x = g @ matrix.t() if grad_x is None else grad_x.addmm_(g, matrix.t())
                del matrix
            g_b = g @ b_c                                                   # (T, r)
            grad_b = (g.t() @ u_j) * s                                      # (d_out, r)
            grad_u_j = g_b * s
            grad_u.append(grad_u_j)
            if scaled:  # ALLoRA: c scales the rows of ∂L/∂B and, through G diag(c) B, ∂L/∂A
                c = next(scales).to(dtype)
                grad_b *= c[:, None]
                grad_u_params.append((g @ (b_c * c[:, None])) * s)
            else:
                grad_u_params.append(grad_u_j)
            grad_factors.append(grad_b)
            start += r
        h = x2 if keep is None else x2 * keep.view_as(x2)
        du = torch.cat(grad_u_params, 1) if len(grad_u_params) > 1 else grad_u_params[0]
        grad_a_all = du.t() @ h                                             # (Σr, d_in)
        if need_x:
            a_all = torch.cat(factors[0::2]).to(dtype) if len(factors) > 2 else factors[0].to(dtype)
            du_x = torch.cat(grad_u, 1) if len(grad_u) > 1 else grad_u[0]
            if keep is None:
                grad_x.addmm_(du_x, a_all)
            else:
                grad_x += (du_x @ a_all) * keep.view_as(x2)
            grad_x = grad_x.view_as(x)
        grads, start = [], 0
        for a, b, grad_b in zip(factors[0::2], factors[1::2], grad_factors):
            grads += [grad_a_all[start:start + a.shape[0]].to(a.dtype), grad_b.to(b.dtype)]
            start += a.shape[0]
        return (grad_x, None, None, None, None, *grads)
