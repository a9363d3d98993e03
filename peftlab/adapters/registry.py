"""The adapter registry: one `@register` on a method's config class names everything the
framework needs (config, layer, controller, PEFT file type), so adding a method edits one file."""
from __future__ import annotations

from dataclasses import dataclass, is_dataclass
from typing import Any

from ..settings import closest, field_names
from .config import AdapterConfig
from .controller import Controller
from .layer import AdapterLayer


@dataclass(frozen=True)
class Method:
    name: str
    config: type[AdapterConfig]
    layer: type[AdapterLayer]
    controller: type[Controller]
    peft_type: str  # the `peft_type` written to adapter_config.json
    aliases: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()  # other peft_types it imports (PEFT's RANDLORA)


_METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, layer: type[AdapterLayer], peft_type: str,
             controller: type[Controller] = Controller, aliases: tuple[str, ...] = (), reads: tuple[str, ...] = ()):
    """Class decorator for a method's config dataclass."""
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"method name must be a lowercase identifier, got {name!r}")

    def decorate(config_cls: type[AdapterConfig]) -> type[AdapterConfig]:
        if not (is_dataclass(config_cls) and issubclass(config_cls, AdapterConfig)):
            raise TypeError(f"{config_cls.__qualname__} must be a dataclass extending AdapterConfig")
        for key in (name, *aliases):
            if key in _METHODS or key in _ALIASES:
                raise ValueError(f"adapter name {key!r} is already registered")
        config_cls.method = name
        _METHODS[name] = Method(name, config_cls, layer, controller, peft_type, tuple(aliases), tuple(reads))
        _ALIASES.update({alias: name for alias in aliases})
        return config_cls

    return decorate


def get_method(name: str) -> Method:
    """The registered method called `name` (or one of its aliases)."""
    key = _ALIASES.get(name, name)
    if key not in _METHODS:
        known = sorted([*_METHODS, *_ALIASES])
        raise ValueError(f"unknown adapter {name!r}{closest(name, known)} Known adapters: {', '.join(known)}")
    return _METHODS[key]


def list_adapters() -> list[str]:
    """The registered method names (aliases not repeated)."""
    return sorted(_METHODS)


def get_config(name: str, **overrides: Any) -> AdapterConfig:
    """The config of method `name` with defaults, updated by `overrides`; unknown fields are errors."""
    method = get_method(name)
    valid = field_names(method.config)
    for key in overrides:
        if key not in valid:
            raise TypeError(
                f"{method.name} has no config field {key!r}{closest(key, valid)} "
                f"Valid fields: {', '.join(valid)}"
            )
    return method.config(**overrides)


def method_of(config: AdapterConfig) -> Method:
    """The method a config instance belongs to."""
    for method in _METHODS.values():
        if type(config) is method.config:
            return method
    raise TypeError(f"{type(config).__name__} is not the config of a registered adapter method")
