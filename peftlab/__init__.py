"""peftlab: parameter-efficient fine-tuning with seven adapter methods behind one lifecycle.

    import peftlab
    model = peftlab.wrap(model, "lora", r=8, target_modules="all-linear")
    print(peftlab.trainable_summary(model))
    peftlab.save_adapter(model, "out/")

The names below are imported on first use (PEP 562), so `peftlab --help` and other commands that
need no model answer without importing torch or transformers.
"""
import importlib
import logging
from typing import Any

# bitsandbytes warns at import on AVX512-BF16 CPUs that an optional fast 4-bit kernel package is
# missing, and the `kernels` package that it asks for it warns that it cannot check the hub offline;
# peftlab runs 4-bit bases through the exact dequantize path anyway (quant.keep_exact_cpu_path)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)

__version__ = "0.1.0"

_PUBLIC = {
    ".adapters": ["AdapterConfig", "AdapterLayer", "Controller", "active_adapter", "add_weighted_adapter",
                  "adapter_names", "controller", "delete_adapter", "disable_adapters", "get_config", "list_adapters",
                  "merge", "set_adapter", "trainable_summary", "unwrap", "wrap"],
    ".io": ["load_adapter", "save_adapter"],
    ".memory": ["estimate_memory"],
    ".models": ["load_model"],
    ".sharding": ["shard"],
    ".trainers": ["TrainConfig", "Trainer"],
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name], __name__), name)
    else:
        try:  # a submodule: peftlab.io, peftlab.adapters, ...
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'peftlab' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
