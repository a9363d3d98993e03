"""Adapter methods. Each module registers itself on import; importing them all here keeps the
registry complete and deterministic (no entry-point discovery)."""
from . import adalora, allora, evalora, increlora, lora, randlora, sara  # noqa: F401
from .config import AdapterConfig
from .controller import Controller
from .layer import AdapterLayer
from .inject import controller, merge, trainable_summary, unwrap, wrap
from .registry import get_config, get_method, list_adapters, register

__all__ = [
    "AdapterConfig", "AdapterLayer", "Controller", "controller", "get_config", "get_method",
    "list_adapters", "merge", "register", "trainable_summary", "unwrap", "wrap",
]
