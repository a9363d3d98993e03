"""Putting adapters into a model and taking them out: target matching, wrap, unwrap, merge.

Matching follows PEFT so that adapter_config.json means the same thing in both libraries:
a string is a regex matched against the full module name, a list matches a full name or a
dotted suffix of it, and "all-linear" takes every adaptable layer but the output head.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .. import kernels, quant
from .config import AdapterConfig
from .controller import Controller
from .layer import AdapterLayer, fullmatch, set_module
from .registry import Method, get_config, method_of

ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")


@dataclass
class AdapterState:
    """What peftlab attaches to a wrapped model (as `model.peftlab`)."""

    method: Method
    controller: Controller
    layers: dict[str, AdapterLayer]
    modules_to_save: list[str]
    originals: dict[str, nn.Module] = field(repr=False)  # modules_to_save as they were before wrap
    sharded: bool = False  # set by peftlab.shard: each process holds a slice of the base

    @property
    def config(self) -> AdapterConfig:
        """The config as the controller holds it (a scheduled method's total_step filled in)."""
        return self.controller.config


def matches(patterns: str | tuple[str, ...], name: str) -> bool:
    if isinstance(patterns, str):
        return fullmatch(patterns, name)
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output layers, which "all-linear" leaves alone (as PEFT does)."""
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    for name, module in model.named_modules():
        if module is output or name in _HEAD_NAMES or (name.split(".")[0] in _HEAD_NAMES):
            heads.add(name)
    return heads


def default_modules_to_save(model: nn.Module) -> tuple[str, ...]:
    """The randomly initialised head of a classification model must train, as PEFT's SEQ_CLS does."""
    if not type(model).__name__.endswith(_CLASSIFIER_SUFFIXES):
        return ()
    names = dict(model.named_modules())
    return tuple(n for n in ("classifier", "score") if n in names)


def find_targets(model: nn.Module, config: AdapterConfig, layer: type[AdapterLayer] = AdapterLayer) -> list[str]:
    """Names of the modules `config` selects, in model order; an error if none match."""
    saved = set(config.modules_to_save or ())
    heads = output_head_names(model) if config.target_modules == ALL_LINEAR else set()
    targets, rejected = [], []
    for name, module in model.named_modules():
        if not name or any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in saved):
            continue
        if config.target_modules == ALL_LINEAR:
            selected = quant.is_adaptable(module) and name not in heads
        else:
            selected = matches(config.target_modules, name)
        if selected and config.exclude_modules and matches(config.exclude_modules, name):
            continue
        if selected:
            if not layer.supports(module):
                rejected.append(f"{name} ({type(module).__name__})")
                continue
            targets.append(name)
    if rejected:
        raise TypeError(
            f"target_modules={config.target_modules!r} selects modules peftlab cannot adapt: "
            f"{', '.join(rejected[:5])}. Adaptable kinds: nn.Linear, GPT-2 Conv1D, bitsandbytes Linear4bit"
            " (and nn.Conv2d with sara)"
        )
    if not targets:
        examples = [n for n, m in model.named_modules() if n and layer.supports(m)][:8]
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matches no adaptable module. Some that exist: {', '.join(examples) or '(none)'}"
        )
    return targets


def target_shapes(model: nn.Module, method: str) -> list[tuple[int, int]]:
    """(d_out, d_in) of every module `method`'s default config would adapt in `model`."""
    config = get_config(method, modules_to_save=())
    modules = dict(model.named_modules())
    return [quant.base_shape(modules[name])[::-1] for name in find_targets(model, config, method_of(config).layer)]


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, "peftlab") or any(isinstance(m, AdapterLayer) for m in model.modules())


def wrap(model: nn.Module, config: AdapterConfig | str, **overrides: Any) -> nn.Module:
    """Inject the adapters `config` describes into `model` in place and return it.

    Everything but the adapter parameters and `modules_to_save` is frozen.
    """
    if isinstance(config, str):
        config = get_config(config, **overrides)
    elif overrides:
        raise TypeError("pass overrides only with a method name, e.g. wrap(model, 'lora', r=16)")
    if is_wrapped(model):
        raise RuntimeError(
            "this model already carries peftlab adapters; wrapping twice would stack them. "
            "Call peftlab.unwrap(model) or peftlab.merge(model) first, or start from a fresh base model"
        )
    method = method_of(config)
    modules = dict(model.named_modules())
    saved = list(config.modules_to_save if config.modules_to_save is not None else default_modules_to_save(model))
    missing = [s for s in saved if s not in modules]
    if missing:
        raise ValueError(f"modules_to_save names modules that do not exist: {missing}")
    config = _with_modules_to_save(config, tuple(saved))
    targets = find_targets(model, config, method.layer)
    if not config.fused and method.layer.low_rank_product is AdapterLayer.low_rank_product:
        raise ValueError(f"fused=False applies to the LoRA family; {method.name} always folds its update "
                         "into the base product and has no separate eager path")

    # every layer and the controller are built before the model is touched: a layer that cannot be
    # built (a rank above the layer's full rank) leaves the model as it was
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        layers = {name: method.layer(modules[name], config, name) for name in targets}
        if config.fused:  # before the controller, which may put a layer on its eager path (IncreLoRA's growth)
            kernels.attach(layers)
        controller = method.controller(model, config, layers)
    except BaseException:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    for name, layer in layers.items():
        set_module(model, name, layer)
        for p in layer.adapter_parameters().values():
            p.requires_grad_(True)
    # modules_to_save train a copy (as PEFT does): a head tied to the input embeddings stays
    # untouched, and unwrap() puts the original back
    originals = {name: modules[name] for name in saved}
    for name in saved:
        set_module(model, name, copy.deepcopy(modules[name]).requires_grad_(True))
    model.peftlab = AdapterState(method, controller, layers, saved, originals)
    return model


def _with_modules_to_save(config: AdapterConfig, saved: tuple[str, ...]) -> AdapterConfig:
    return config if config.modules_to_save == saved else replace(config, modules_to_save=saved)


def state_of(model: nn.Module) -> AdapterState:
    state = getattr(model, "peftlab", None)
    if state is None:
        raise ValueError("this model has no peftlab adapters; call peftlab.wrap(model, ...) or peftlab.load_adapter first")
    return state


def controller(model: nn.Module) -> Controller:
    """The wrapped model's controller, for hand-written loops (README, "Python API")."""
    return state_of(model).controller


def unwrap(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging: the model computes exactly what the base computed."""
    state = state_of(model)
    for name, layer in state.layers.items():
        if layer.merged:
            layer.unmerge()
        set_module(model, name, layer.base_layer)
    for name, original in state.originals.items():
        set_module(model, name, original)
    del model.peftlab
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (float32 math, cast once) and return a plain model.

    A 4-bit base is replaced by the float32 module it stood for (nn.Linear or GPT-2's Conv1D)
    holding dequantize(W) + ΔW: re-quantizing would throw most of the update away, so peftlab
    never does it silently.
    """
    state = state_of(model)
    if state.sharded:
        raise ValueError("cannot merge a sharded model (each process holds a slice of the base); save its adapter "
                         "and merge it into the unsharded base: peftlab merge RUN_DIR, or load_adapter + merge")
    dequantized = []
    for name, layer in state.layers.items():
        if quant.is_4bit(layer.base_layer):
            dequantized.append(name)
        set_module(model, name, layer.merged_module())
    if dequantized:  # a plain model now: no quantization config or quantizer, it saves and loads like any other
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False
        warnings.warn(
            f"merged {len(dequantized)} 4-bit layers onto their dequantized float32 weights "
            "(not re-quantized, so the update is kept exactly)", stacklevel=2,
        )
    del model.peftlab
    return model


def trainable_summary(model: nn.Module) -> str:
    """PEFT's familiar line: 'trainable params: N || all params: M || trainable%: P'."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte
            n *= 2 * p.element_size()
        total += n
        trainable += n if p.requires_grad else 0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}"
