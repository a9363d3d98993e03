"""Expected peak memory of a training run, per process, before running it: `estimate_memory`.

The tensors are counted, not modelled. Two training steps (the second runs with AdamW's moments
alive) go through the real model code, the adapter's kernels, gradient checkpointing and the
optimizer on fake tensors (FakeTensorMode: shapes and dtypes, no data, no compute), while a
dispatch mode adds up the storages alive at each moment. Whatever the trace cannot see is added
from the model's real weights: a 4-bit base's packed bytes in place of its float ones (plus the
weights it dequantizes at a time), the shards FSDP leaves each process (plus the units it gathers
at a time), and the runtime (interpreter and libraries).
"""
from __future__ import annotations

import ctypes
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from . import quant
from .adapters.inject import is_wrapped, state_of, wrap

RUNTIME_BYTES = 500 * 2 ** 20  # RSS of Python with torch, transformers, accelerate and peftlab imported (Linux, CPU)
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 4 * 2 ** 20  # glibc's mallopt parameter, and peftlab's value


def return_freed_memory() -> None:
    """Let freed activations give their memory back to the system, as the estimate assumes (glibc).

    glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), after which
    tensors of up to that size come from the heap, whose freed pages stay resident: a run's RSS
    crept 200-450 MiB above its live tensors over the first steps, 27% over `--dry-run` on a 60M NF4
    Llama. A fixed threshold stops the rise. At 4 MiB, blocks that size and larger (activations,
    logits chunks) are mmapped and returned on free while smaller ones reuse the heap; 128 KiB (what
    MALLOC_MMAP_THRESHOLD_=131072 sets) returns everything but cost ~25% step time in page faults on
    SmolLM2 (4 MiB: within the noise of ~5%). peftlab.Trainer calls this; a set
    MALLOC_MMAP_THRESHOLD_ is left as the user chose it, and non-glibc systems are left alone."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes expected at the peak of a training step, per process."""

    base_weights: int   # the frozen weights this process holds (its shards under FSDP)
    adapter: int        # trainable tensors, their gradients and AdamW's two moments
    activations: int    # saved activations and the transients of the step at its peak
    runtime: int        # interpreter and libraries

    @property
    def total(self) -> int:
        return self.base_weights + self.adapter + self.activations + self.runtime

    def __str__(self) -> str:
        gib = lambda n: f"{n / 2 ** 30:.2f}"  # noqa: E731
        return (f"expected peak memory per process: {gib(self.total)} GiB (base weights {gib(self.base_weights)}, "
                f"adapter + gradients + AdamW {gib(self.adapter)}, activations {gib(self.activations)}, "
                f"runtime {gib(self.runtime)})")


def estimate_memory(model: nn.Module, *, batch_size: int = 1, seq_len: int = 512, gradient_checkpointing: bool = False,
                    bf16: bool = False, processes: int = 1, fsdp: bool = False, method: str | None = None,
                    **adapter_settings: Any) -> MemoryEstimate:
    """Peak memory per process of training `model` on batches of `batch_size` x `seq_len` tokens.

    `model` is a transformers model, wrapped by peftlab (its adapter is used) or not (then give
    `method` and its settings, e.g. method="lora", r=16), in float or loaded in 4-bit; or a
    transformers config (a causal LM, float32). With `fsdp` the base is sharded over `processes`.
    """
    from transformers import PretrainedConfig

    if isinstance(model, PretrainedConfig):
        from transformers import AutoModelForCausalLM

        config, build, real = model, AutoModelForCausalLM.from_config, None
    else:
        config, build, real = model.config, type(model)._from_config, model
    if real is not None and is_wrapped(real):
        if method is not None or adapter_settings:
            raise ValueError("the model is wrapped already: its adapter is the one estimated; drop method/settings")
        # the config as its saved file gives it back: choices made from the weights (SaRA's selected
        # entries, AdaLoRA's ranks) come as sizes, which fake tensors can be traced with
        state = state_of(real)
        adapter = replace(state.config, **type(state.config).from_peft_fields(state.config.peft_fields(state.layers)))
    elif method is None:
        raise ValueError("give the adapter to estimate: a wrapped model, or method='lora' (and its settings)")
    else:
        adapter = None
    traced, block_bytes, unit_bytes, largest_4bit = _trace(build, config, adapter, method, adapter_settings,
                                                            batch_size, seq_len, gradient_checkpointing, bf16)
    weights = traced["frozen"] if real is None else _base_weight_bytes(real)
    if fsdp and processes > 1:
        # each process keeps 1/N; a running unit is gathered whole, and FSDP prefetches the next block
        weights = weights // processes + unit_bytes + 2 * block_bytes
    dequantized = 0
    if real is not None and any(quant.is_4bit(m) for m in real.modules()):
        # a 4-bit layer's float weight exists while it runs: one matrix, or under checkpointing a
        # block's worth (the recomputed forward keeps them for its backward)
        dequantized = block_bytes if gradient_checkpointing else largest_4bit
    return MemoryEstimate(base_weights=weights, adapter=traced["adapter"],
                          activations=traced["peak"] - traced["frozen"] - traced["adapter"] + dequantized,
                          runtime=RUNTIME_BYTES)


def _trace(build, config, adapter, method, settings, batch_size, seq_len, checkpointing, bf16):
    """Peak live bytes of two training steps on fake tensors, and the sizes the caller needs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .kernels import lora as kernels

    scratch, kernels._SCRATCH = kernels._SCRATCH, {}  # the kernels' reused buffers must not turn fake
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
            # deepcopy (of a classification head, for modules_to_save) asks a fake tensor for its data pointer
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
            model = build(config).requires_grad_(False)
            model = wrap(model, adapter) if adapter is not None else wrap(model, method, **settings)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
            ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
            labels = ids if type(model).__name__.endswith("ForCausalLM") else torch.zeros(batch_size, dtype=torch.long)
            live = _LiveBytes()
            for tensor in [*model.parameters(), *model.buffers(), ids, labels]:
                live.track(tensor)
            model.train()
            with live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                for _ in range(2):
                    model(input_ids=ids, labels=labels).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
            sizes = _unit_sizes(model)
    finally:
        kernels._SCRATCH = scratch
    adapter_bytes = sum(p.numel() * (2 * p.element_size() + 8) for p in trainable)
    traced = {"peak": live.peak, "adapter": adapter_bytes, "frozen": frozen}
    return (traced, *sizes)


def _unit_sizes(model: nn.Module) -> tuple[int, int, int]:
    """Float bytes of the largest transformer block, the largest other FSDP unit (embeddings,
    head) and the largest single linear weight."""
    from .sharding import transformer_blocks

    def size(module: nn.Module) -> int:
        return sum(p.numel() * 4 for p in module.parameters() if not p.requires_grad)

    blocks = transformer_blocks(model)
    ends = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    linears = [m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear)]
    return max(map(size, blocks), default=0), max(map(size, ends), default=0), max(linears, default=0)


def _base_weight_bytes(real: nn.Module) -> int:
    """The frozen weights as the real model stores them (4-bit: packed bytes plus their absmax)."""
    total = 0
    for p in real.parameters():
        if p.requires_grad:
            continue
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of tensor storages alive now, and the most at any moment (fake storages included)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self.alive: set[int] = set()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.alive:
            return
        self.alive.add(key)
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out
