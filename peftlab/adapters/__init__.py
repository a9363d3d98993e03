"""Adapter methods. Each module registers itself on import; importing them all here keeps the
registry complete and deterministic (no entry-point discovery)."""
from . import adalora, allora, evalora, increlora, lora, randlora, sara  # noqa: F401
from .combine import add_weighted_adapter
from .config import AdapterConfig
from .controller import Controller
from .layer import AdapterLayer
from .inject import (active_adapter, adapter_names, controller, delete_adapter, disable_adapters, merge, set_adapter,
                     trainable_summary, unwrap, wrap)
from .registry import get_config, get_method, list_adapters, register

__all__ = [
    "AdapterConfig", "AdapterLayer", "Controller", "active_adapter", "add_weighted_adapter", "adapter_names", "controller", "delete_adapter",
    "disable_adapters", "get_config", "get_method", "list_adapters", "merge", "register", "set_adapter",
    "trainable_summary", "unwrap", "wrap",
]
