"""Triton kernels for the LoRA adapter path on CUDA (one adapter per call).

The dropout keep-mask is never stored: each kernel regenerates it from a seed and the element's
position in x with Philox (`tl.rand`), so forward and backward see the same mask and backward
keeps x, the (T, r) product u and a seed (LoRAFusion's seeded dropout, arXiv:2510.00206).
One generic tiled matmul covers the three adapter products:

    u      = (x ⊙ m) Aᵀ · 1/(1-p)              mask on the left operand
    y     += s · u Bᵀ                          accumulated into the base output in place
    ∂A     = (s·∂u)ᵀ (x ⊙ m) · 1/(1-p)         mask on the right operand
    ∂x    += ((s·∂u) A ⊙ m) · 1/(1-p)          mask on the output, accumulated in place

Checked against the eager path on CPU with TRITON_INTERPRET=1 (tests/test_triton.py); the base
product and the small (d_out, r) gradients stay with torch (cuBLAS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from .lora import base_matrix

BLOCK = 16  # tl.dot's smallest tile; the adapter rank is padded to it by masked loads


@triton.jit
def _masked_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   alpha, seed, p, mask_cols,
                   MASK_A: tl.constexpr, MASK_B: tl.constexpr, MASK_C: tl.constexpr, ACCUMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C (+)= alpha · (A' @ B'), where the operand named by MASK_* is multiplied by the keep-mask of
    the x it stands for; x's element (i, j) draws tl.rand(seed, i * mask_cols + j) >= p."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a_in = (rm[:, None] < M) & (rk[None, :] < K)
        b_in = (rk[:, None] < K) & (rn[None, :] < N)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=a_in, other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=b_in, other=0.0)
        if MASK_A:  # A is x (tokens, d_in)
            a = tl.where(tl.rand(seed, rm[:, None] * mask_cols + rk[None, :]) >= p, a, 0.0)
        if MASK_B:  # B is x (tokens, d_in), reduced over tokens
            b = tl.where(tl.rand(seed, rk[:, None] * mask_cols + rn[None, :]) >= p, b, 0.0)
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
    acc = acc * alpha
    if MASK_C:  # C is ∂x (tokens, d_in)
        acc = tl.where(tl.rand(seed, rm[:, None] * mask_cols + rn[None, :]) >= p, acc, 0.0)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_in = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_in, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_in)


def matmul(a: Tensor, b: Tensor, out: Tensor, alpha: float = 1.0, *, seed: int = 0, p: float = 0.0,
           mask_cols: int = 0, mask: str = "", accumulate: bool = False) -> Tensor:
    """out (+)= alpha · a @ b with the dropout mask of x applied to operand `mask` ('a', 'b', 'c' or '')."""
    (m, k), n = a.shape, b.shape[1]
    grid = (triton.cdiv(m, BLOCK), triton.cdiv(n, BLOCK))
    _masked_matmul[grid](a, b, out, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         out.stride(0), out.stride(1), alpha, seed, p, mask_cols,
                         MASK_A=mask == "a", MASK_B=mask == "b", MASK_C=mask == "c", ACCUMULATE=accumulate,
                         BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=BLOCK)
    return out


@triton.jit
def _keep_mask(out_ptr, numel, seed, p, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    tl.store(out_ptr + offsets, tl.rand(seed, offsets) >= p, mask=offsets < numel)


def keep_mask(shape: tuple[int, int], seed: int, p: float, device: torch.device) -> Tensor:
    """The mask the kernels regenerate, materialized (for tests and debugging)."""
    out = torch.empty(shape, dtype=torch.bool, device=device)
    _keep_mask[(triton.cdiv(out.numel(), 1024),)](out, out.numel(), seed, p, BLOCK_SIZE=1024)
    return out


class TritonLoRA(torch.autograd.Function):
    """y = base(x) + s (drop(x) Aᵀ) Bᵀ for one adapter; saves x, u, A, B and the dropout seed."""

    @staticmethod
    def forward(ctx, x: Tensor, base: nn.Module, a: Tensor, b: Tensor, scale: float, p: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        seed = int(torch.randint(0, 2 ** 31 - 1, (), device="cpu")) if p > 0 else 0  # from the global RNG
        keep_scale = 1.0 / (1.0 - p)
        u = matmul(x2, a.to(x.dtype).t(), x2.new_empty(x2.shape[0], a.shape[0]), keep_scale,
                   seed=seed, p=p, mask_cols=x2.shape[1], mask="a" if p > 0 else "")
        matrix = base_matrix(base, x.dtype)
        y = x2 @ matrix if base.bias is None else torch.addmm(base.bias.to(x.dtype), x2, matrix)
        del matrix
        matmul(u, b.to(x.dtype).t(), y, scale, accumulate=True)
        ctx.base, ctx.scale, ctx.p, ctx.seed = base, scale, p, seed
        ctx.save_for_backward(x, u, a, b)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, u, a, b = ctx.saved_tensors
        x2, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]).contiguous()
        p, keep_scale, dtype = ctx.p, 1.0 / (1.0 - ctx.p), g.dtype
        grad_b = (g.t() @ u) * ctx.scale                                    # (d_out, r)
        grad_u = (g @ b.to(dtype)) * ctx.scale                              # (T, r)
        masked = dict(seed=ctx.seed, p=p, mask_cols=x2.shape[1])
        grad_a = matmul(grad_u.t(), x2, torch.empty(a.shape, dtype=dtype, device=x.device), keep_scale,
                        mask="b" if p > 0 else "", **masked)
        grad_x = None
        if ctx.needs_input_grad[0]:
            matrix = base_matrix(ctx.base, dtype)                           # a 4-bit base is dequantized again
            grad_x = g @ matrix.t()
            del matrix
            matmul(grad_u, a.to(dtype), grad_x, keep_scale, mask="c" if p > 0 else "", accumulate=True, **masked)
            grad_x = grad_x.view_as(x)
        return grad_x, None, grad_a.to(a.dtype), grad_b.to(b.dtype), None, None
