"""peftlab: parameter-efficient fine-tuning with seven adapter methods behind one lifecycle.

    import peftlab
    model = peftlab.wrap(model, "lora", r=8, target_modules="all-linear")
    print(peftlab.trainable_summary(model))
    peftlab.save_adapter(model, "out/")
"""
from .adapters import (
    AdapterConfig,
    AdapterLayer,
    Controller,
    controller,
    get_config,
    list_adapters,
    merge,
    trainable_summary,
    unwrap,
    wrap,
)
from .io import load_adapter, save_adapter
from .trainers import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterLayer", "Controller", "controller", "get_config", "list_adapters",
    "load_adapter", "merge", "save_adapter", "TrainConfig", "Trainer", "trainable_summary", "unwrap", "wrap",
]
