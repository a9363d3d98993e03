"""What every method's config shares: targeting, validation, the PEFT file fields, sizing to a
parameter budget; and the two bases that several methods build on (a rank-r update, a schedule
laid out over the run's length). A method's config declares only what is its own.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ..settings import SettingError, at_least, default_of, opt, validate

if TYPE_CHECKING:
    from .layer import AdapterLayer


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """What to wrap. Every method's config extends this; the matching itself lives in inject.py."""

    method: ClassVar[str] = "adapter"  # set by registry.register
    # preset name -> field values it sets (a value may be a function of the config, e.g. ALLoRA's α = r)
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}}
    # fields PEFT's adapter_config.json has no key for: io keeps them in peftlab.json
    peftlab_only: ClassVar[tuple[str, ...]] = ()

    target_modules: str | tuple[str, ...] = opt(
        "all-linear",
        "module-name suffixes (list), one regex matched against the full name (string), or "
        "'all-linear' (every Linear / GPT-2 Conv1D / 4-bit Linear except the output head)",
    )
    exclude_modules: str | tuple[str, ...] = opt((), "suffixes or one regex of modules never wrapped")
    modules_to_save: tuple[str, ...] | None = opt(
        None,
        "modules trained in full and saved with the adapter (e.g. a classification head); "
        "None = the head of a *ForSequenceClassification / *ForTokenClassification model",
    )
    fused: bool = opt(
        True,
        "LoRA-family layers (lora, adalora, increlora, evalora, allora) run base + adapter as one fused "
        "autograd kernel; False = the plain eager path. randlora and sara always fold their update",
    )
    preset: str | None = opt(
        None,
        "paper = the paper's parametrization, initialization, scales and regularizer (README, 'Paper presets'); "
        "None = peftlab's defaults, which train at LoRA's learning rate. Values given explicitly win",
    )

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in self.presets:
                raise SettingError(f"{self.method}: preset must be one of {', '.join(self.presets)} or null, got "
                                   f"{self.preset!r}", "preset")
            defaults = {f.name: default_of(f) for f in fields(self)}
            for name, value in self.presets[self.preset].items():  # fields left at their default take the preset's
                if getattr(self, name) == defaults[name]:
                    object.__setattr__(self, name, value(self) if callable(value) else value)
        validate(self, self.method)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            object.__setattr__(self, name, value if isinstance(value, str) else tuple(value))
        if self.modules_to_save is not None:
            saved = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else tuple(self.modules_to_save)
            if not all(saved):
                raise ValueError(f"modules_to_save has an empty name: {list(saved)}; name modules such as 'classifier'")
            object.__setattr__(self, "modules_to_save", saved)
        if self.target_modules in ((), ""):
            raise ValueError("target_modules is empty; name modules to wrap or use 'all-linear'")

    def for_modules(self, count: int) -> "AdapterConfig":
        """The config completed for the `count` modules it wraps (defaults that depend on it)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def peft_fields(self, layers: dict[str, AdapterLayer]) -> dict[str, Any]:
        """The method's hyperparameters as written to adapter_config.json (targeting is added by io);
        `layers` lets a method record per-module state such as live ranks."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_METHOD and k not in self.peftlab_only}

    def peftlab_fields(self) -> dict[str, Any]:
        """Hyperparameters the PEFT format has no key for; io keeps them in peftlab.json."""
        return {k: getattr(self, k) for k in self.peftlab_only}

    @classmethod
    def peft_keys(cls) -> set[str]:
        """The adapter_config.json keys this method reads (io warns about the others it does not know)."""
        return {f.name for f in fields(cls)} - _NOT_METHOD - set(cls.peftlab_only)

    @classmethod
    def from_peft_fields(cls, saved: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from an adapter_config.json (PEFT writes null for a setting left unset)."""
        return {k: v for k, v in saved.items() if k in cls.peft_keys() and v is not None}

    def peft_native(self, layers: dict[str, AdapterLayer]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(tensors, adapter_config) in HF PEFT's own format, for a method whose peftlab file differs
        from PEFT's (io.export_peft writes them); None: save_adapter's file already is PEFT's, or PEFT
        has no such method."""
        return None

    # --- sizing to a parameter budget (`peftlab compare --budget`) ---
    @classmethod
    def sized(cls, size: int) -> dict[str, Any]:
        """The settings of size `size` (a rank for most methods)."""
        raise NotImplementedError

    def final_parameter_count(self, shapes: list[tuple[int, int]]) -> int:
        """Trainable adapter parameters at the end of training on modules of these (d_out, d_in)."""
        raise NotImplementedError

    @classmethod
    def for_budget(cls, shapes: list[tuple[int, int]], budget: int) -> dict[str, Any]:
        """The settings whose final parameter count on `shapes` comes closest to `budget`."""
        best = min(range(1, 257), key=lambda size: abs(cls(**cls.sized(size)).final_parameter_count(shapes) - budget))
        return cls.sized(best)


# targeting and run-time choices; a preset's values are written out as the values they are
_NOT_METHOD = {"target_modules", "exclude_modules", "modules_to_save", "fused", "preset"}


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(AdapterConfig):
    """A rank-r update per module (LoRA, EVA, ALLoRA; RandLoRA's r is its bases' rank)."""

    r: int = opt(8, "rank of the update", check=at_least(1))

    @classmethod
    def sized(cls, size: int) -> dict[str, Any]:
        return {"r": size}

    def final_parameter_count(self, shapes: list[tuple[int, int]]) -> int:
        return sum(self.r * (d_out + d_in) for d_out, d_in in shapes)


@dataclass(frozen=True, kw_only=True)
class ScheduledConfig(AdapterConfig):
    """A method whose schedule is laid out over the run's length (AdaLoRA's budget, IncreLoRA's
    growth, SaRA's re-selection): `total_step` is given, or the front end fills it in."""

    total_step: int | None = opt(None, "optimizer steps of the whole run, over which the schedule is laid out; "
                                       "None: the trainer fills in the run's length", check=at_least(1))
