"""Typed, documented, validated settings: every config dataclass of peftlab (adapter configs,
TrainConfig, the run's model and data sections) declares its fields with `opt`, and `validate`
checks an instance once, in its `__post_init__`, against the fields' annotations and checks.

    r: int = opt(8, "rank of the update", check=at_least(1))

A wrong type (`r=true`), a non-finite number or a value outside its check is a ValueError that
names the setting, what it takes and what it got. No torch here: the CLI's help and the recipe
checks import this module alone.
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable


class SettingError(ValueError):
    """A setting's value is wrong; `key` names the setting (so a caller can say where it came from)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Check:
    """A rule a setting's value must follow; `says` completes "<name> must be ...". None passes
    unchecked (a field whose annotation admits None uses None for "the default")."""

    test: Callable[[Any], bool]
    says: str

    def __call__(self, value: Any) -> bool:
        return value is None or bool(self.test(value))


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f">= {low}")


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"> {low}")


def within(low: float, high: float, *, closed: bool = False) -> Check:
    """low <= v < high (v <= high with `closed`)."""
    return Check(lambda v: low <= v <= high if closed else low <= v < high, f"in [{low}, {high}{']' if closed else ')'}")


def one_of(*values: Any) -> Check:
    return Check(lambda v: v in values, f"one of {', '.join(map(str, values))}")


def opt(default: Any, doc: str, check: Check | None = None, **kw: Any) -> Any:
    """A dataclass field with help text (the CLI's help, `peftlab keys`, error messages) and an
    optional check that `validate` applies."""
    metadata = {"help": doc, "check": check}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def default_of(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.init]


def validate(config: Any, what: str) -> None:
    """Every field of the dataclass `config` fits its annotation, is finite if a number, and passes
    its check; `what` names the config in the message (e.g. "lora", "TrainConfig")."""
    hints = annotations(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        if not fits(value, hints[f.name]):
            raise SettingError(f"{what}: {f.name} must be {describe_type(hints[f.name])}, got {shorten(repr(value))}",
                               f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError(f"{what}: {f.name} must be a finite number, got {value}", f.name)
        check = f.metadata.get("check")
        if check is not None and not check(value):
            plain = [a for a in typing.get_args(hints[f.name]) or (hints[f.name],) if a is not type(None)]
            kind = {int: "an integer ", float: "a number "}.get(plain[0], "") if len(plain) == 1 else ""
            raise SettingError(f"{what}: {f.name} must be {kind}{check.says}, got {shorten(repr(value))}", f.name)


_HINTS: dict[type, dict[str, Any]] = {}


def annotations(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: resolving strings is not free)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def fits(value: Any, annotation: Any) -> bool:
    """Whether `value` is of the annotated type: bool is not an int, an int is a float, a list is
    a tuple (YAML has no tuples); the items of list/tuple/dict are checked one level deep."""
    if annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return any(fits(value, a) for a in args)
    if annotation is type(None) or annotation is None:
        return value is None
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(fits(v, items[0]) for v in value) if items else \
            isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(fits(v, args[1]) for v in value.values()))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def describe_type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in args))
    if origin in (tuple, list):
        return "a list" + (f" of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "")
    if origin is dict:
        return "a mapping"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def closest(word: str, options: list[str]) -> str:
    """'; did you mean X?' for the option closest to a mistyped `word` (or sharing its last part,
    so `r` finds `target_r` and `lora_alpha` finds `randlora_alpha`), or ''."""
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    if match:
        return f"; did you mean {match[0]!r}?"
    tail = word.split("_")[-1]
    related = [o for o in options if o.split("_")[-1] == tail]
    if related:
        return f"; did you mean {' or '.join(repr(o) for o in related)}?"
    return ""


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 15] + f"... ({len(text):,} chars)"
