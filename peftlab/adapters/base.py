"""The machinery every adapter method shares: config base, layer base, controller base.

A method is a layer (what one wrapped module computes) plus, when it changes over training, a
controller (what happens between optimizer steps). See docs/design-notes.md.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .. import kernels, quant


PEFT_PREFIX = "base_model.model."  # PEFT's key prefix of a module's adapter tensors in its files


def opt(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with help text (used by `--help`, the YAML recipes and error messages)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": doc}, **kw)
    return field(default=default, metadata={"help": doc}, **kw)


def check_finite(config: Any) -> None:
    """Every float setting of a config dataclass is a finite number (a NaN alpha trains nothing)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}: {f.name} must be a finite number, got {value}")


def _as_tuple(value: Any, name: str) -> tuple[str, ...] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be a string (regex or 'all-linear') or a list of module names, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """What to wrap. Every method's config extends this; the matching itself lives in inject.py."""

    target_modules: str | tuple[str, ...] = opt(
        "all-linear",
        "module-name suffixes (list), one regex matched against the full name (string), or "
        "'all-linear' (every Linear / GPT-2 Conv1D / 4-bit Linear except the output head)",
    )
    exclude_modules: str | tuple[str, ...] = opt((), "suffixes or one regex of modules never wrapped")
    modules_to_save: tuple[str, ...] | None = opt(
        None,
        "modules trained in full and saved with the adapter (e.g. a classification head); "
        "None = the head of a *ForSequenceClassification / *ForTokenClassification model",
    )
    fused: bool = opt(
        True,
        "LoRA-family layers (lora, adalora, increlora, evalora, allora) run base + adapter as one fused "
        "autograd kernel; False = the plain eager path. randlora and sara always fold their update",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _as_tuple(self.target_modules, "target_modules"))
        object.__setattr__(self, "exclude_modules", _as_tuple(self.exclude_modules, "exclude_modules"))
        if self.modules_to_save is not None:
            saved = _as_tuple(self.modules_to_save, "modules_to_save")
            if isinstance(saved, str):
                saved = (saved,)
            if not all(saved):
                raise ValueError(f"modules_to_save has an empty name: {list(saved)}; name modules such as 'classifier'")
            object.__setattr__(self, "modules_to_save", saved)
        if self.target_modules in ((), ""):
            raise ValueError("target_modules is empty; name modules to wrap or use 'all-linear'")
        check_finite(self)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def peft_fields(self, layers: dict[str, "AdapterLayer"]) -> dict[str, Any]:
        """The method's hyperparameters as written to adapter_config.json (targeting is added by io);
        `layers` lets a method record per-module state such as live ranks."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_METHOD}

    def peftlab_fields(self) -> dict[str, Any]:
        """Hyperparameters the PEFT format has no key for; io keeps them in peftlab.json."""
        return {}

    @classmethod
    def peft_keys(cls) -> set[str]:
        """The adapter_config.json keys this method reads (io warns about the others it does not know)."""
        return {f.name for f in fields(cls)} - _NOT_METHOD

    @classmethod
    def from_peft_fields(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from an adapter_config.json."""
        return {k: v for k, v in saved.items() if k in cls.peft_keys()}

    def peft_native(self, layers: dict[str, "AdapterLayer"]) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
        """(tensors, adapter_config) in HF PEFT's own format, for a method whose peftlab file differs
        from PEFT's (io.export_peft writes them); None: save_adapter's file already is PEFT's, or PEFT
        has no such method."""
        return None

    # --- sizing to a parameter budget (`peftlab compare --budget`) ---
    @classmethod
    def sized(cls, size: int) -> dict[str, Any]:
        """The settings of size `size` (a rank for most methods)."""
        return {"r": size}

    def final_parameter_count(self, shapes: list[tuple[int, int]]) -> int:
        """Trainable adapter parameters at the end of training on modules of these (d_out, d_in)."""
        return sum(self.r * (d_out + d_in) for d_out, d_in in shapes)

    @classmethod
    def for_budget(cls, shapes: list[tuple[int, int]], budget: int) -> dict[str, Any]:
        """The settings whose final parameter count on `shapes` comes closest to `budget`."""
        best = min(range(1, 257), key=lambda size: abs(cls(**cls.sized(size)).final_parameter_count(shapes) - budget))
        return cls.sized(best)


_NOT_METHOD = {"target_modules", "exclude_modules", "modules_to_save", "fused"}  # targeting and run-time choices


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a full name or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module_name):
            return value
    return default


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
    Subclasses create `lora_A` (r, d_in), `lora_B` (d_out, r) and set `scale`."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scale: float

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


class Controller:
    """What a method does between optimizer steps. The default does nothing (plain LoRA).

    The trainer, the transformers callback and hand-written loops call these hooks at the same
    points (README, "Python API"); no front end knows any method by name.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer]):
        self.model = model
        self.config = config
        self.layers = layers  # module name -> wrapper, in model order
        self.optimizer: torch.optim.Optimizer | None = None

    def prepare(self, batches: Iterable[dict[str, Tensor]]) -> None:
        """One-off work after wrapping, before the optimizer exists; consumes no optimizer step."""

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Front ends hand over the optimizer once it exists (SaRA resets state when it re-selects)."""
        if any(type(p).__name__ == "DTensor" for layer in self.layers.values() for p in layer.adapter_parameters().values()):
            # fully_shard without ignored_params: controllers would mix whole tensors with shards
            raise ValueError("the adapter's parameters were sharded (fully_shard on the wrapped model); shard with "
                             "peftlab.shard(model) instead, which shards the base and keeps the adapter whole")
        self.optimizer = optimizer

    def expect_total_steps(self, total_steps: int) -> None:
        """Front ends announce how many optimizer steps they will run (schedules are laid out over it)."""

    def penalty(self, step: int) -> Tensor | float:
        """A regularizer added to the training loss of optimizer step `step` (once per step), so that
        clipping and the logged gradient norm see it as in the papers' code: `loss + ctl.penalty(step)`."""
        return 0.0

    def before_optimizer_step(self, step: int) -> None:
        """Gradients are final (accumulated, clipped, all-reduced); `step` counts finished steps."""

    def after_optimizer_step(self, step: int) -> None:
        """Weights are updated and gradients not yet zeroed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state)

    def check_state_keys(self, state: dict[str, Any]) -> None:
        """A checkpoint's controller state must fit this model exactly (same method, same layers)."""
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"{type(self).__name__} state does not fit this model: missing "
                             f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")

    def report(self) -> dict[str, Any]:
        """Values for the logger, e.g. the live rank of each module and the budget."""
        return {}


class ScheduledController(Controller):
    """A controller whose schedule is laid out over the run's length (AdaLoRA's budget, IncreLoRA's
    growth, SaRA's re-selection). The length is the config's `total_step` when given; otherwise the
    front end announces it through `expect_total_steps`, and a mismatch is an error rather than a
    schedule that silently ends early or never (PEFT #1801's class of bug)."""

    def __init__(self, model: nn.Module, config: AdapterConfig, layers: dict[str, AdapterLayer]):
        super().__init__(model, config, layers)
        if config.total_step is not None:
            self.plan()

    @property
    def method(self) -> str:
        return type(self.config).__name__.removesuffix("Config").lower()

    def expect_total_steps(self, total_steps: int) -> None:
        if self.config.total_step is None:
            self.config = replace(self.config, total_step=total_steps)  # validates the schedule against it
            self.plan()
        elif self.config.total_step != total_steps:
            raise ValueError(f"{self.method} total_step={self.config.total_step} but training runs {total_steps} "
                             f"optimizer steps; set total_step={total_steps} (or leave it unset: the trainer fills it in)")

    def plan(self) -> None:
        """Lay out the schedule over `self.config.total_step`."""

    def check_planned(self) -> None:
        if self.config.total_step is None:
            raise RuntimeError(
                f"{self.method} lays out its schedule over the run's length, which it was not told: call "
                "peftlab.controller(model).expect_total_steps(N) before training (peftlab.Trainer and "
                "PeftlabCallback do this), or wrap with total_step=N")
