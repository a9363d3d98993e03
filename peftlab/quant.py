"""Base-layer access for the three kinds of module peftlab wraps: nn.Linear, GPT-2 Conv1D and
bitsandbytes' NF4 Linear4bit. Everything returns and accepts the canonical (d_out, d_in) float32
orientation, so adapter code never needs to know which kind it sits on.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit (checked by name so that bitsandbytes is imported only when used)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_adaptable(module: nn.Module) -> bool:
    """The module kinds an adapter can wrap."""
    return isinstance(module, (nn.Linear, Conv1D)) or is_4bit(module)


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a wrappable module; a Conv2d's d_in is in_channels/groups x kernel area."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    if isinstance(module, nn.Linear) or is_4bit(module):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel(), module.out_channels
    raise TypeError(
        f"cannot wrap {type(module).__name__}: peftlab adapts nn.Linear, transformers' Conv1D, "
        "bitsandbytes' Linear4bit (and nn.Conv2d with sara)"
    )


def keep_exact_cpu_path(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight for its CPU bf16 inference kernel.

    On CPUs with AVX512-BF16, Linear4bit's first eval-mode forward repacks the weight and stores
    its absmax in bf16, which changes the quantized weight for good (about 3e-4 per element) and
    makes eval outputs differ from training ones by about 1e-2. A wrapped base keeps the
    dequantize-then-matmul path in both modes, so evaluation sees the model that was trained.
    """
    if is_4bit(module) and hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def dequantize(module: nn.Module) -> Tensor:
    """The float32 (d_out, d_in) weight of a Linear4bit."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    # under FSDP the gathered weight is a plain tensor of the packed bytes (in its quant_storage
    # dtype): the quantization state stays on the module, where bitsandbytes registered it
    state = getattr(weight, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise RuntimeError("the 4-bit layer is not quantized yet; move it to its device first (.to('cpu'))")
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks CPU weights for its bf16 inference kernel on the first eval-mode
        # forward; undo it as bitsandbytes' own state_dict() does, then dequantize as usual
        weight.data, weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(weight.data, state)
        state = weight.quant_state
    return bnbf.dequantize_4bit(weight.data, state).float()


def base_weight(module: nn.Module) -> Tensor:
    """The base weight as a float32 (d_out, d_in) tensor (a copy)."""
    if is_4bit(module):
        return dequantize(module)
    if isinstance(module, Conv1D):
        return module.weight.detach().float().t().clone()
    return module.weight.detach().float().reshape(module.weight.shape[0], -1).clone()  # Conv2d: (out, in*kh*kw)


@torch.no_grad()
def set_base_weight(module: nn.Module, weight: Tensor) -> None:
    """Write a float32 (d_out, d_in) weight back in the module's own layout and dtype."""
    if is_4bit(module):
        raise RuntimeError("a 4-bit weight is never overwritten in place; see peftlab.merge")
    target = module.weight
    target.copy_((weight.t() if isinstance(module, Conv1D) else weight).reshape(target.shape).to(target.dtype))


@torch.no_grad()
def dequantized_module(module: nn.Module, delta: Tensor | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The plain module a Linear4bit stands for, holding its dequantized weight (+ `delta`, in the
    canonical (d_out, d_in) layout) and bias: nn.Linear, or GPT-2's Conv1D when transformers
    quantized one (it records `source_cls`), so a saved model loads in its own architecture."""
    weight = dequantize(module)                                          # (d_out, d_in)
    if delta is not None:
        weight = weight + delta.to(weight.dtype)
    d_out, d_in = weight.shape
    if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
        plain = Conv1D(d_out, d_in).to(device=weight.device, dtype=dtype)
        plain.weight.copy_(weight.t())                                   # Conv1D stores (d_in, d_out)
        plain.bias.copy_(module.bias if module.bias is not None else torch.zeros(d_out))
    else:
        plain = nn.Linear(d_in, d_out, bias=module.bias is not None, device=weight.device, dtype=dtype)
        plain.weight.copy_(weight)
        if module.bias is not None:
            plain.bias.copy_(module.bias)
    return plain.requires_grad_(False)
