"""Putting adapters into a model and taking them out: target matching, wrap, unwrap, merge.

Matching follows PEFT so that adapter_config.json means the same thing in both libraries:
a string is a regex matched against the full module name, a list matches a full name or a
dotted suffix of it, and "all-linear" takes every adaptable layer but the output head.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from torch import nn

from .. import kernels, quant
from .config import AdapterConfig
from .controller import Controller
from .layer import AdapterLayer, fullmatch, set_module
from .registry import Method, get_config, method_of
from .routing import BASE_ROWS, Routing

ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")


@dataclass
class AdapterState:
    """One named adapter: its layers (in the model while it is the active one, aside otherwise),
    its controller and its own trained copies of the modules_to_save."""

    name: str
    method: Method
    controller: Controller
    layers: dict[str, AdapterLayer]
    trained: dict[str, nn.Module]   # modules_to_save, this adapter's copies
    originals: dict[str, nn.Module] = field(repr=False)  # modules_to_save as the base has them

    @property
    def config(self) -> AdapterConfig:
        """The config as the controller holds it (a scheduled method's total_step filled in)."""
        return self.controller.config

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.trained)


@dataclass
class Adapters:
    """What peftlab attaches to a wrapped model (as `model.peftlab`): its named adapters, one of
    them active. Only the active adapter's layers are in the model, so only it computes, trains
    and has its controller run; switching swaps layers, never copies a weight (PEFT's named
    adapters, with the same names: "default" first)."""

    states: dict[str, AdapterState]
    active: str
    sharded: bool = False  # set by peftlab.shard: each process holds a slice of the base
    routing: Routing | None = field(default=None, repr=False)  # `adapter_names=` in forward (routing.py)

    @property
    def current(self) -> AdapterState:
        return self.states[self.active]


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


def wrap(model: nn.Module, config: AdapterConfig | str, *, adapter_name: str = "default", **overrides: Any) -> nn.Module:
    """Inject the adapters `config` describes into `model` in place and return it.

    Everything but the adapter parameters and `modules_to_save` is frozen. On a model that
    already carries adapters, this adds one more under a new `adapter_name` (of any method); as
    in PEFT, the active adapter stays what it was until `set_adapter(model, adapter_name)`.
    """
    if isinstance(config, str):
        config = get_config(config, **overrides)
    elif overrides:
        raise TypeError("pass overrides only with a method name, e.g. wrap(model, 'lora', r=16)")
    check_adapter_name(adapter_name)
    adapters = getattr(model, "peftlab", None)
    if adapters is None and is_wrapped(model):
        raise RuntimeError("this model carries adapter layers peftlab did not put there (a copied or pickled model?); "
                           "start from a fresh base model")
    if adapters is not None:
        if adapter_name in adapters.states:
            raise ValueError(f"this model already has an adapter named {adapter_name!r} ({', '.join(adapters.states)}); "
                             "pass another adapter_name=, or peftlab.delete_adapter(model, "
                             f"{adapter_name!r}) first")
        _check_unmerged(adapters.current, "add an adapter")
        _detach(model, adapters.current)
    try:
        state = _build(model, config, adapter_name)
    finally:
        if adapters is not None:  # the new adapter waits aside; the active one returns
            _attach(model, adapters.current)
    if adapters is None:
        model.peftlab = Adapters({adapter_name: state}, adapter_name, routing=Routing(model))
        _attach(model, state)
    else:
        adapters.states[adapter_name] = state
    return model


def check_adapter_name(name: str) -> None:
    """Adapter names become directory names (PEFT's layout) and row labels of mixed batches."""
    if not isinstance(name, str) or not name or name != name.strip() or any(c in name for c in "/\\.") \
            or name == BASE_ROWS:
        raise ValueError(f"adapter_name={name!r} is not usable: give a non-empty name without '/', '\\' or '.', "
                         f"other than {BASE_ROWS!r} (which names the base model's rows of a mixed batch)")


def _build(model: nn.Module, config: AdapterConfig, name: str) -> AdapterState:
    """The adapter `config` describes for the bare `model`, with nothing put into the model yet."""
    method = method_of(config)
    modules = dict(model.named_modules())
    saved = list(config.modules_to_save if config.modules_to_save is not None else default_modules_to_save(model))
    missing = [s for s in saved if s not in modules]
    if missing:
        raise ValueError(f"modules_to_save names modules that do not exist: {missing}")
    config = _with_modules_to_save(config, tuple(saved))
    targets = find_targets(model, config, method.layer)
    config = config.for_modules(len(targets))
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
    for layer in layers.values():
        for p in layer.adapter_parameters().values():
            p.requires_grad_(True)
    # modules_to_save train a copy (as PEFT does): a head tied to the input embeddings stays
    # untouched, and unwrap() puts the original back
    trained = {s: copy.deepcopy(modules[s]).requires_grad_(True) for s in saved}
    return AdapterState(name, method, controller, layers, trained, {s: modules[s] for s in saved})


def _attach(model: nn.Module, state: AdapterState) -> None:
    for name, layer in state.layers.items():
        set_module(model, name, layer)
    for name, module in state.trained.items():
        set_module(model, name, module)


def _detach(model: nn.Module, state: AdapterState) -> None:
    """Put the base modules back where `state`'s layers and trained copies were."""
    for name, layer in state.layers.items():
        set_module(model, name, layer.base_layer)
    for name, original in state.originals.items():
        set_module(model, name, original)


def _check_unmerged(state: AdapterState, action: str) -> None:
    if any(layer.merged for layer in state.layers.values()):
        raise RuntimeError(f"cannot {action}: adapter {state.name!r} is merged into the base weights; "
                           "unmerge its layers (layer.unmerge()) first")


def _with_modules_to_save(config: AdapterConfig, saved: tuple[str, ...]) -> AdapterConfig:
    return config if config.modules_to_save == saved else replace(config, modules_to_save=saved)


def adapters_of(model: nn.Module) -> Adapters:
    """The named adapters of a wrapped model (`model` may be DDP- or compile-wrapped)."""
    adapters = getattr(_root(model), "peftlab", None)
    if adapters is None:
        raise ValueError("this model has no peftlab adapters; call peftlab.wrap(model, ...) or peftlab.load_adapter first")
    return adapters


def state_of(model: nn.Module, adapter_name: str | None = None) -> AdapterState:
    """The named adapter, or the active one."""
    adapters = adapters_of(model)
    if adapter_name is None:
        return adapters.current
    if adapter_name not in adapters.states:
        raise KeyError(f"no adapter named {adapter_name!r}; this model has {', '.join(map(repr, adapters.states))}")
    return adapters.states[adapter_name]


def controller(model: nn.Module) -> Controller:
    """The active adapter's controller, for hand-written loops (README, "Python API")."""
    return state_of(model).controller


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(adapters_of(model).states)


def active_adapter(model: nn.Module) -> str:
    return adapters_of(model).active


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the adapter that computes, trains and has its controller run."""
    adapters = adapters_of(model)
    state = state_of(model, adapter_name)
    if adapter_name == adapters.active:
        return
    _check_unmerged(adapters.current, "switch adapters")
    root = _root(model)
    _detach(root, adapters.current)
    _attach(root, state)
    adapters.active = adapter_name


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter; deleting the active one makes the first remaining adapter active."""
    adapters = adapters_of(model)
    state = state_of(model, adapter_name)
    if len(adapters.states) == 1:
        raise ValueError(f"{adapter_name!r} is the model's only adapter; peftlab.unwrap(model) removes it")
    if adapter_name == adapters.active:
        _check_unmerged(state, "delete the active adapter")
        set_adapter(model, next(n for n in adapters.states if n != adapter_name))
    del adapters.states[adapter_name]


def _root(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """While inside, the model computes exactly what its base computes: every adapted layer runs its
    base module alone (SaRA's and RandLoRA's folded updates included) and the modules_to_save are
    the originals again; on exit, also after an exception, the adapter is back. The reference
    model of DPO is this, with no second copy of the weights. `model` may be DDP- or compile-wrapped."""
    state = state_of(model)
    _check_unmerged(state, "disable the adapter")
    root = _root(model)
    for layer in state.layers.values():
        layer.enabled = False
    for name, original in state.originals.items():
        set_module(root, name, original)
    try:
        yield model
    finally:
        for layer in state.layers.values():
            layer.enabled = True
        for name, module in state.trained.items():
            set_module(root, name, module)


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the model computes exactly what the base computed."""
    state = state_of(model)
    for layer in state.layers.values():
        if layer.merged:
            layer.unmerge()
    _detach(model, state)
    _forget(model)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into its base weights (float32 math, cast once) and return a plain
    model; the other adapters are dropped (merge one copy of the base per adapter you need).

    A 4-bit base is replaced by the float32 module it stood for (nn.Linear or GPT-2's Conv1D)
    holding dequantize(W) + ΔW: re-quantizing would throw most of the update away, so peftlab
    never does it silently.
    """
    if adapters_of(model).sharded:
        raise ValueError("cannot merge a sharded model (each process holds a slice of the base); save its adapter "
                         "and merge it into the unsharded base: peftlab merge RUN_DIR, or load_adapter + merge")
    state = state_of(model)
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
    _forget(model)
    return model


def _forget(model: nn.Module) -> None:
    routing = model.peftlab.routing
    if routing is not None:
        routing.remove()
    del model.peftlab


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
