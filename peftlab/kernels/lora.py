"""The fused LoRA-family product: base + adapter in one autograd node, with a hand-written backward.

For adapters j that read the same input x (one, or q/k/v, or gate/up):

    y_j = x W_jᵀ + b_j + s_j · (drop(x) A_jᵀ) B_jᵀ          (LoRA, Hu et al. 2021, Eq. 3)

Forward makes one stacked product drop(x) [A_1; A_2; ...]ᵀ, then each base output with its low-rank
term accumulated in place (no separate adapter output, no add). Backward keeps only what it needs:
x (already alive: it is the previous layer's output), the dropout keep-mask as one byte per
element instead of a dropped float copy, the small (tokens, Σr) product, and the factors. A 4-bit
base is dequantized again in backward rather than kept (QLoRA, arXiv:2305.14314, stores only the 4-bit weight),
except under gradient checkpointing, where the recomputed forward's dequantized weights go straight
to the backward that follows it: one dequantization per forward pass either way.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

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
    levels = _levels(p)
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= levels / 2 ** _DROPOUT_BITS, keep_scale_of(p)
    numel = shape.numel()
    words = scratch("words", (numel + 3) // 4, torch.int64, device).random_(-2 ** 63, None)  # full 64-bit range
    uniform16 = words.view(torch.int16)[:numel].view(shape)                             # uniform on [-2¹⁵, 2¹⁵)
    return uniform16 >= levels - 2 ** (_DROPOUT_BITS - 1), keep_scale_of(p)


def keep_scale_of(p: float) -> float:
    """1/(1 - p) for p rounded to 16 bits, the p the masks are drawn with."""
    return 2 ** _DROPOUT_BITS / (2 ** _DROPOUT_BITS - _levels(p))


def _levels(p: float) -> int:
    return round(p * 2 ** _DROPOUT_BITS)


def base_matrix(base: nn.Module, dtype: torch.dtype) -> Tensor:
    """The matrix M with base(x) = x M + bias: Wᵀ for Linear (a view), W for GPT-2's Conv1D,
    a freshly dequantized Wᵀ for 4-bit (a temporary, never kept)."""
    if quant.is_4bit(base):
        return quant.dequantize(base).to(dtype).t()
    weight = base.weight.to(dtype)
    return weight if isinstance(base, Conv1D) else weight.t()


_SCRATCH: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}


def scratch(purpose: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused flat buffer for a transient (never saved, never returned) tensor. Fresh multi-MB
    allocations page-fault on every step on CPU; reusing the memory made dropout 1.6x cheaper."""
    key = (purpose, dtype, torch.device(device))
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def masked(x2: Tensor, keep: Tensor, purpose: str) -> tuple[Tensor, Tensor]:
    """(x2 ⊙ keep, keep as x2's dtype), both in scratch buffers (a float mask multiplies 2x faster)."""
    keep_f = scratch(f"{purpose}.keep", keep.numel(), x2.dtype, x2.device).view(keep.shape).copy_(keep)
    h = torch.mul(x2, keep_f, out=scratch(f"{purpose}.h", x2.numel(), x2.dtype, x2.device).view(x2.shape))
    return h, keep_f


Matrix = Callable[[torch.dtype], Tensor]  # a base's M in a dtype, made when needed and dropped after use


def lora_forward(x2: Tensor, keep: Tensor | None, keep_scale: float, matrices: list[Matrix],
                 biases: list[Tensor | None], scales: list[float],
                 factors: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Outputs (T, d_out_j) of the adapters sharing x2 (T, d_in), the stacked product u (T, Σr) and
    the stacked [A_1; A_2; ...] (Σr, d_in) in x2's dtype, which backward reuses."""
    dtype = x2.dtype
    h = x2 if keep is None else masked(x2, keep, "forward")[0]
    a_all = (torch.cat(factors[0::2]) if len(factors) > 2 else factors[0]).to(dtype)
    u = h @ a_all.t()                                                       # (T, Σr): one stacked product
    outputs, start = [], 0
    for matrix_of, bias, scale, a, b in zip(matrices, biases, scales, factors[0::2], factors[1::2]):
        matrix = matrix_of(dtype)
        y = x2 @ matrix if bias is None else torch.addmm(bias.to(dtype), x2, matrix)
        del matrix
        y.addmm_(u[:, start:start + a.shape[0]], b.to(dtype).t(), alpha=scale * keep_scale)  # in place, no add
        outputs.append(y)
        start += a.shape[0]
    return outputs, u, a_all


def lora_backward(grads: list[Tensor], x2: Tensor, keep: Tensor | None, keep_scale: float, u: Tensor,
                  a_all: Tensor, matrices: list[Matrix], scales: list[float], factors: list[Tensor],
                  row_scales: list[Tensor | None], need_x: bool) -> tuple[Tensor | None, list[Tensor]]:
    """∂L/∂x2 (None unless need_x) and ∂L/∂A_1, ∂L/∂B_1, ... from the output gradients (T, d_out_j)."""
    dtype = grads[0].dtype
    grad_x, grad_u, grad_u_params, grad_bs, start = None, [], [], [], 0
    for g, matrix_of, scale, a, b, c in zip(grads, matrices, scales, factors[0::2], factors[1::2], row_scales):
        s, r, b_c = scale * keep_scale, a.shape[0], b.to(dtype)
        if need_x:
            matrix = matrix_of(dtype)                                       # a 4-bit base is dequantized again
            grad_x = g @ matrix.t() if grad_x is None else grad_x.addmm_(g, matrix.t())
            del matrix
        grad_b = torch.mm(u[:, start:start + r].t(), g).t().mul_(s)        # (d_out, r); (uᵀG)ᵀ is 2x faster
        grad_u.append(torch.mm(g, b_c).mul_(s))                             # (T, r): ∂L/∂u
        if c is not None:  # ALLoRA: c scales the rows of ∂L/∂B and, via G diag(c) B, ∂L/∂A; never ∂L/∂x
            c = c.to(dtype)
            grad_b *= c[:, None]
            grad_u_params.append(torch.mm(g, b_c * c[:, None]).mul_(s))
        grad_bs.append(grad_b)
        start += r
    stack = (lambda ts: torch.cat(ts, 1)) if len(grad_u) > 1 else (lambda ts: ts[0])
    du = stack(grad_u)
    h, keep_f = (x2, None) if keep is None else masked(x2, keep, "backward")
    grad_a_all = (stack(grad_u_params) if grad_u_params else du).t() @ h    # (Σr, d_in)
    if need_x:
        if keep is None:
            grad_x.addmm_(du, a_all.to(dtype))
        else:
            product = scratch("backward.product", h.numel(), dtype, h.device).view(h.shape)
            grad_x.addcmul_(torch.mm(du, a_all.to(dtype), out=product), keep_f)
    out, start = [], 0
    for a, b, grad_b in zip(factors[0::2], factors[1::2], grad_bs):
        out += [grad_a_all[start:start + a.shape[0]].to(a.dtype), grad_b.to(b.dtype)]
        start += a.shape[0]
    return grad_x, out


class FusedLoRA(torch.autograd.Function):
    """y_j = base_j(x) + s_j (drop(x) A_jᵀ) B_jᵀ for adapters sharing x; see the module docstring.

    `factors` is A_1, B_1, A_2, B_2, ...; `row_scales[j]`, when given, multiplies the rows of the
    A_j/B_j gradients only (ALLoRA's c, Eq. 9); the input gradient never sees it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor | None, keep_scale: float, adapters: tuple[Adapter, ...],
                row_scales: tuple[Tensor | None, ...], *factors: Tensor) -> tuple[Tensor, ...]:
        x2 = x.reshape(-1, x.shape[-1])                                     # (T, d_in)
        matrices = [partial(base_matrix, adapter.base) for adapter in adapters]
        if torch._C._current_graph_task_id() != -1:
            # a checkpointed block's forward, rerun inside backward: the original node's backward
            # follows at once, and takes the 4-bit weights dequantized here rather than again
            matrices = [_keep(a.base, matrix_of) if quant.is_4bit(a.base) else matrix_of
                        for a, matrix_of in zip(adapters, matrices)]
        outputs, u, a_all = lora_forward(x2, None if keep is None else keep.view_as(x2), keep_scale, matrices,
                                         [adapter.base.bias for adapter in adapters], [a.scale for a in adapters],
                                         list(factors))
        ctx.adapters, ctx.keep_scale, ctx.row_scales = adapters, keep_scale, row_scales
        ctx.save_for_backward(x, keep, u, a_all, *factors)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        x, keep, u, a_all, *factors = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        grad_x, grads = lora_backward(
            [g.reshape(-1, g.shape[-1]) for g in grad_outputs], x2, None if keep is None else keep.view_as(x2),
            ctx.keep_scale, u, a_all, [_kept(a.base) for a in ctx.adapters],
            [a.scale for a in ctx.adapters], factors, list(ctx.row_scales), ctx.needs_input_grad[0])
        return (None if grad_x is None else grad_x.view_as(x), None, None, None, None, *grads)


_RECOMPUTED: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()


def _keep(base: nn.Module, matrix_of: Matrix) -> Matrix:
    """matrix_of, remembering its result for the backward of `base`'s node (under checkpointing)."""
    def make(dtype: torch.dtype) -> Tensor:
        _RECOMPUTED[base] = matrix = matrix_of(dtype)
        return matrix
    return make


def _kept(base: nn.Module) -> Matrix:
    """The matrix a recomputed forward kept for this backward, else base_matrix made afresh."""
    matrix = _RECOMPUTED.pop(base, None)
    return partial(base_matrix, base) if matrix is None else partial(Tensor.to, matrix)


# Under torch.compile a single layer runs as one opaque op, so inductor compiles the model around it
# and the eager kernel above (its byte masks, in-place accumulation) is what runs inside.
@torch.library.custom_op("peftlab::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, row_scale: Tensor | None,
                scale: float, dropout: float, conv1d: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, keep-mask or an empty tensor, u) for one adapter on a Linear / Conv1D base; see FusedLoRA."""
    x2 = x.reshape(-1, x.shape[-1])
    keep, keep_scale = dropout_keep_mask(x2.shape, dropout, x.device) if dropout > 0 else (None, 1.0)
    (y,), u, _ = lora_forward(x2, keep, keep_scale, [_dense(weight, conv1d)], [bias], [scale], [a, b])
    return y.view(*x.shape[:-1], y.shape[-1]), x.new_empty(0, dtype=torch.bool) if keep is None else keep, u


@lora_linear.register_fake
def _(x, weight, bias, a, b, row_scale, scale, dropout, conv1d):
    d_out = weight.shape[1] if conv1d else weight.shape[0]
    tokens = x.numel() // x.shape[-1]
    keep = x.new_empty((tokens, x.shape[-1]) if dropout > 0 else (0,), dtype=torch.bool)
    return x.new_empty(*x.shape[:-1], d_out), keep, x.new_empty(tokens, a.shape[0])


@torch.library.custom_op("peftlab::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, keep: Tensor, u: Tensor, a: Tensor, b: Tensor,
                         row_scale: Tensor | None, scale: float, dropout: float, conv1d: bool,
                         need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    grad_x, (grad_a, grad_b) = lora_backward(
        [grad.reshape(-1, grad.shape[-1])], x2, keep if dropout > 0 else None, keep_scale_of(dropout), u, a,
        [_dense(weight, conv1d)], [scale], [a, b], [row_scale], need_x)
    return (torch.zeros_like(x) if grad_x is None else grad_x.view_as(x)), grad_a.contiguous(), grad_b.contiguous()


@lora_linear_backward.register_fake
def _(grad, x, weight, keep, u, a, b, row_scale, scale, dropout, conv1d, need_x):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    x, weight, _, a, b, row_scale, scale, dropout, conv1d = inputs
    ctx.save_for_backward(x, weight, output[1], output[2], a, b, row_scale)
    ctx.scale, ctx.dropout, ctx.conv1d = scale, dropout, conv1d


def _backward(ctx, grad, _keep_grad, _u_grad):
    x, weight, keep, u, a, b, row_scale = ctx.saved_tensors
    grad_x, grad_a, grad_b = torch.ops.peftlab.lora_linear_backward(
        grad, x, weight, keep, u, a, b, row_scale, ctx.scale, ctx.dropout, ctx.conv1d, ctx.needs_input_grad[0])
    return grad_x, None, None, grad_a, grad_b, None, None, None, None


lora_linear.register_autograd(_backward, setup_context=_setup_context)


def _dense(weight: Tensor, conv1d: bool) -> Matrix:
    return lambda dtype: weight.to(dtype) if conv1d else weight.to(dtype).t()


class FastDropout(nn.Dropout):
    """nn.Dropout drawing its CPU mask as the fused kernel does (4x cheaper; p rounded to 16 bits).

    On a 2-core CPU the base model's own dropout was 19% of a MiniLM training step; peftlab.Trainer
    (fast_dropout=True) swaps every plain nn.Dropout of the model for this class while it trains and
    swaps them back when it ends. Other devices keep torch's own (already fused) dropout.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return _MaskedScale.apply(x, self.p)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep, keep_scale = dropout_keep_mask(x.shape, p, x.device)
        ctx.keep_scale = keep_scale
        ctx.save_for_backward(keep)
        return x * _scaled_mask(keep, keep_scale, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad * _scaled_mask(keep, ctx.keep_scale, grad.dtype), None


def _scaled_mask(keep: Tensor, keep_scale: float, dtype: torch.dtype) -> Tensor:
    """keep · 1/(1-p) as floats, in a scratch buffer (one pass over the byte mask)."""
    out = scratch("dropout.mask", keep.numel(), dtype, keep.device).view(keep.shape)
    return torch.mul(keep, keep_scale, out=out)


@contextmanager
def fast_dropout(model: nn.Module) -> Iterator[None]:
    """While inside, the model's plain nn.Dropout modules are FastDropout; afterwards, exactly the
    modules that were swapped are nn.Dropout again (also after an exception)."""
    swapped = [m for m in model.modules() if type(m) is nn.Dropout]
    for module in swapped:
        module.__class__ = FastDropout
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.Dropout
