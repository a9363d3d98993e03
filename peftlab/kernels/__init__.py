"""Fused adapter math: a torch autograd kernel for the LoRA family (CPU and GPU) and, on CUDA,
Triton kernels for its dropout and low-rank products."""
from .fusion import Fusion, LowRankProduct, attach, blocker, dropout_p
from .lora import FastDropout, FusedLoRA, dropout_keep_mask, fast_dropout

__all__ = ["FastDropout", "Fusion", "FusedLoRA", "LowRankProduct", "attach", "blocker", "dropout_keep_mask",
           "dropout_p", "fast_dropout"]
