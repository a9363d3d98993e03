"""peftlab: parameter-efficient fine-tuning with seven adapter methods behind one lifecycle.

    import peftlab
    model = peftlab.wrap(model, "lora", r=8, target_modules="all-linear")
    print(peftlab.trainable_summary(model))
    peftlab.save_adapter(model, "out/")
"""
import logging

# bitsandbytes warns at import on AVX512-BF16 CPUs that an optional fast 4-bit kernel package is
# missing, and the `kernels` package that it asks for it warns that it cannot check the hub offline;
# peftlab runs 4-bit bases through the exact dequantize path anyway (quant.keep_exact_cpu_path)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)

from .adapters import (  # noqa: E402
    AdapterConfig,
    AdapterLayer,
    Controller,
    active_adapter,
    add_weighted_adapter,
    adapter_names,
    controller,
    delete_adapter,
    disable_adapters,
    get_config,
    list_adapters,
    merge,
    set_adapter,
    trainable_summary,
    unwrap,
    wrap,
)
from .io import load_adapter, save_adapter
from .memory import estimate_memory
from .models import load_model
from .sharding import shard
from .trainers import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterLayer", "Controller", "active_adapter", "add_weighted_adapter", "adapter_names", "controller", "delete_adapter",
    "disable_adapters", "estimate_memory", "get_config", "list_adapters", "load_adapter", "load_model", "merge",
    "save_adapter", "set_adapter", "shard", "TrainConfig", "Trainer", "trainable_summary", "unwrap", "wrap",
]
