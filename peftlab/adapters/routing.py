"""Mixed-adapter batches: each row of a batch names the adapter that computes it, as PEFT's
`adapter_names=` does in forward and generate:

    model(input_ids, adapter_names=["default", "support", "__base__"])

For the length of that one forward, every module some named adapter adapts is stood in for by a
`RoutedModule`: the base output for all rows plus each adapter's own update on its rows (a
modules_to_save copy computes its rows instead of the original). Nothing is copied; afterwards,
also after an exception, the model is as it was.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .layer import AdapterLayer, set_module

BASE_ROWS = "__base__"  # PEFT's name for the rows of a mixed batch that the base model computes alone


class RoutedModule(nn.Module):
    def __init__(self, base: nn.Module, updates: dict[str, AdapterLayer], replacements: dict[str, nn.Module],
                 rows: dict[str, Tensor], batch: int):
        super().__init__()
        self.base, self.rows, self.batch = base, rows, batch
        self.updates, self.replacements = updates, replacements  # plain dicts: not submodules of the model

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if x.shape[0] != self.batch:
            raise ValueError(f"adapter_names has {self.batch} entries but the batch has {x.shape[0]} rows; name one "
                             "adapter per row (generate: one sequence per row, num_beams=1)")
        y = self.base(x, *args, **kwargs)
        for name, index in self.rows.items():
            if name in self.updates:
                y = y.index_add(0, index, self.updates[name].branch(x[index]).to(y.dtype))
            elif name in self.replacements:
                y = y.index_copy(0, index, self.replacements[name](x[index], *args, **kwargs).to(y.dtype))
        return y


class Routing:
    """Takes `adapter_names=` out of a wrapped model's forward (two forward hooks) and generate (an
    instance method in front of the class's) and routes the rows for that call."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.replaced: dict[str, nn.Module] = {}
        self.by_forward = False
        self.handles = [model.register_forward_pre_hook(self.enter, with_kwargs=True),
                        model.register_forward_hook(self.leave, always_call=True)]
        if callable(getattr(model, "generate", None)):
            model.generate = self.generate

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        vars(self.model).pop("generate", None)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        generate = type(self.model).generate
        if adapter_names is None:
            return generate(self.model, *args, **kwargs)
        self.install(list(adapter_names), _batch_device(args, kwargs))
        try:
            return generate(self.model, *args, **kwargs)
        finally:
            self.restore()

    def enter(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        names = kwargs.pop("adapter_names", None)
        if names is None:
            return None
        if self.replaced:
            raise ValueError("adapter_names is already set for this generate call; give it to generate only")
        self.install(list(names), _batch_device(args, kwargs))
        self.by_forward = True
        return args, kwargs

    def leave(self, model: nn.Module, args: tuple, output: Any) -> None:
        if self.by_forward:
            self.restore()

    def restore(self) -> None:
        for name, module in self.replaced.items():
            set_module(self.model, name, module)
        self.replaced.clear()
        self.by_forward = False

    def install(self, names: Sequence[str], device: torch.device) -> None:
        adapters = self.model.peftlab
        unknown = sorted(set(names) - set(adapters.states) - {BASE_ROWS})
        if unknown:
            raise ValueError(f"adapter_names names adapters this model does not have: {unknown}; it has "
                             f"{list(adapters.states)} (and {BASE_ROWS!r} for the base model alone)")
        if any(layer.merged for layer in adapters.current.layers.values()):
            raise RuntimeError("a mixed-adapter batch needs the base weights unmerged; unmerge the active adapter first")
        rows = {name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
                for name in dict.fromkeys(names) if name != BASE_ROWS}
        states = [adapters.states[name] for name in rows]
        modules = dict(self.model.named_modules())
        for target in dict.fromkeys(t for state in states for t in (*state.layers, *state.trained)):
            updates = {s.name: s.layers[target] for s in states if target in s.layers}
            replacements = {s.name: s.trained[target] for s in states if target in s.trained}
            base = next(iter(updates.values())).base_layer if updates else \
                next(s.originals[target] for s in states if target in s.originals)
            self.replaced[target] = modules[target]
            set_module(self.model, target, RoutedModule(base, updates, replacements, rows, len(names)))


def _batch_device(args: tuple, kwargs: dict[str, Any]) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")
