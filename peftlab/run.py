"""A run as data and its files: what `peftlab train` builds from its settings (peftlab.recipes),
and the record the other commands read.

    build_run(config)                   -> Run         model wrapped, tokenizer, datasets, collator
    record_run / read_record(dir)                      run.json: the one file eval/merge/export/compare read
    load_trained / merge_trained                       a finished run's model back, or merged
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import RUN_RECORD as RECORD_NAME
from .io import atomic_save, refuse_overlap
from .models import load_model, load_tokenizer
from .recipes import ModelConfig, RunConfig, as_mapping

RECORD_VERSION = 1
TRAIN_EXAMPLES, EVAL_EXAMPLES = 640, 1000  # the embedded sentiment task


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


def build_data(config: RunConfig, tokenizer, context: int | None = None,
               eval_only: bool = False) -> tuple[list, list, list[str]]:
    """(train, eval) features and where each came from: the dataset and its held-out tail, or the
    dataset and eval_dataset whole; the embedded task when no dataset is named. `eval_only` reads
    and tokenizes the eval split alone (train comes back empty)."""
    from . import data as datalib
    from .chat import causal_lm_features, chat_notes, conversation, preference_features

    data, task = config.data, config.model.task
    max_length = data.max_length or min(context or 2048, 2048)
    if data.dataset is None and data.eval_dataset is None:
        if task != "seq-cls":
            raise ValueError(f"the embedded dataset is a classification task; pass --dataset for task={task}")
        seed = config.train.seed
        splits = [("embedded sentiment (train)", [] if eval_only else datalib.sentiment_dataset(TRAIN_EXAMPLES, seed)),
                  ("embedded sentiment (eval)", datalib.sentiment_dataset(EVAL_EXAMPLES, seed + 1))]
    elif data.eval_dataset is not None:
        train = [] if eval_only or data.dataset is None else datalib.read_records(data.dataset, data.split, data.subset)
        splits = [(data.dataset, train), (data.eval_dataset,
                                          datalib.read_records(data.eval_dataset, data.eval_split, data.subset))]
    else:
        rows = datalib.read_records(data.dataset, data.split, data.subset)
        cut = max(1, int(len(rows) * (1 - data.eval_fraction)))  # a deterministic held-out tail
        if cut >= len(rows):
            raise ValueError(f"{data.dataset} has {len(rows)} examples: too few to hold out an eval split")
        splits = [(data.dataset, [] if eval_only else rows[:cut]), (f"{data.dataset} (held-out tail)", rows[cut:])]
    columns = {"prompt_column": data.prompt_column, "response_column": data.response_column,
               "messages_column": data.messages_column}
    if task != "seq-cls":
        chat = task == "dpo" or any(conversation(row, "", 0, **columns) is not None for _, rows in splits
                                    for row in rows[:100])
        for note in chat_notes(tokenizer, chat, data.system_prompt):
            print(f"peftlab: note: {note}")
    out = []
    for source, rows in splits:
        if not rows:
            out.append([])
        elif task == "seq-cls":
            out.append(datalib.classification_features(rows, tokenizer, source, config.model.num_labels, max_length,
                                                       data.text_column, data.pair_column, data.label_column))
        elif task == "dpo":
            out.append(preference_features(rows, tokenizer, source, max_length, data.drop_truncated, data.system_prompt))
        else:
            out.append(causal_lm_features(rows, tokenizer, source, max_length, data.packing, data.drop_truncated,
                                          data.max_truncated_fraction, data.system_prompt, columns))
    return out[0], out[1], [source for source, _ in splits]


def load_base(model: ModelConfig):
    """The base model a run's model section names."""
    return load_model(model.path, model.task, load_in_4bit=model.load_in_4bit, num_labels=model.num_labels)


def build_run(config: RunConfig) -> Run:
    """Load, tokenize and wrap everything a run needs (seeded: the head's and adapters' init are part of it)."""
    from transformers import set_seed

    from .adapters.inject import wrap
    from .chat import use_chat_template
    from .data import PadCollator

    set_seed(config.train.seed)
    tokenizer = load_tokenizer(config.model.path)
    if config.data.chat_template:  # saved with the run, so generate and eval render alike
        use_chat_template(tokenizer, config.data.chat_template)
    model = load_base(config.model)
    context = getattr(model.config, "max_position_embeddings", None)
    train_set, eval_set, _ = build_data(config, tokenizer, context)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    wrap(model, config.adapter)
    return Run(config, model, tokenizer, train_set, eval_set, PadCollator(tokenizer.pad_token_id))


# --------------------------------------------------------------------------------------- record
@dataclass
class RunRecord:
    """What a finished run left: its settings and its results (run.json)."""

    config: RunConfig
    result: dict[str, Any] = field(default_factory=dict)
    trainable_params: int | None = None


def record_run(run: Run, result: dict[str, Any], seconds: float) -> tuple[dict[str, Any], list[str]]:
    """After training: the tokenizer, run.json and the plots in the output directory; returns the
    result with timing and the files written."""
    from .plots import plot_run

    out = Path(run.config.train.output_dir)
    atomic_save(out, run.tokenizer.save_pretrained)
    result = {**result, "wall_time_s": round(seconds, 1)}
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
        data = as_mapping(data, str(path))
        if data.get("format_version", 0) > RECORD_VERSION:
            raise ValueError(f"{path} was written by a newer peftlab (format {data['format_version']}); upgrade peftlab")
        settings = {k: v for k, v in data.items() if k not in ("format_version", "result", "trainable_params")}
        return RunRecord(RunConfig.from_dict(settings, str(path)), data.get("result") or {}, data.get("trainable_params"))
    _, adapter = read_config(directory)
    saved = json.loads((directory / "adapter_config.json").read_text())
    if not saved.get("base_model_name_or_path"):
        raise ValueError(f"{directory} does not name its base model (no run.json, no base_model_name_or_path in "
                         "adapter_config.json); pass --model")
    task = "causal-lm" if saved.get("task_type") == "CAUSAL_LM" else "seq-cls"
    model = ModelConfig(path=saved["base_model_name_or_path"], task=task, num_labels=_saved_num_labels(directory))
    return RunRecord(RunConfig(adapter, model=model))


def refuse_writing_over_inputs(output_dir: str | os.PathLike, directory: str | os.PathLike,
                               model_path: str | None = None) -> None:
    """`merge` and `export` never write into, around or over the adapter or the base model they read
    (the base as --model names it, or as the run's record does)."""
    base = model_path or read_record(directory).config.model.path
    refuse_overlap(output_dir, {"adapter": directory, "base model": base})


def describe_run(run: Run) -> str:
    """What `train --dry-run` prints: the resolved settings, the data, the trainable-parameter line and
    the expected peak memory per process at the run's longest batch (under fsdp, for the launch's
    $WORLD_SIZE processes)."""
    import yaml

    from .adapters.inject import trainable_summary
    from .memory import estimate_memory

    train = run.config.train
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    longest = max(len(row["input_ids"]) for row in run.train_set)
    estimate = estimate_memory(run.model, batch_size=train.per_device_train_batch_size, seq_len=longest,
                               gradient_checkpointing=train.gradient_checkpointing, bf16=train.bf16,
                               processes=processes, fsdp=train.fsdp)
    where = f" with fsdp over {processes} processes" if train.fsdp and processes > 1 else ""
    lines = [yaml.safe_dump(run.config.to_dict(), sort_keys=False).rstrip(),
             f"examples: {len(run.train_set)} train, {len(run.eval_set)} eval",
             trainable_summary(run.model),
             f"{estimate}{where}, at batches of {train.per_device_train_batch_size} x {longest} tokens"]
    if run.config.model.task != "seq-cls":
        from .chat import marked

        first = run.train_set[0]
        prefix = "chosen_" if "chosen_input_ids" in first else ""
        lines.append(f"the first training example{' (its chosen response)' if prefix else ''} as the model sees it, "
                     f"trained tokens between ⟦ and ⟧:\n"
                     f"{marked(run.tokenizer, {k: first[prefix + k] for k in ('input_ids', 'labels')})}")
    return "\n".join(lines)


def load_trained(directory: str | os.PathLike, model_path: str | None = None, load_in_4bit: bool = False,
                 task: str | None = None):
    """(record, model with its adapter loaded, tokenizer) of a run or adapter directory; the base is
    loaded as it was trained (4-bit if it was), or from `model_path`; `task` is what the caller needs."""
    from .io import load_adapter

    record = read_record(directory)
    model = record.config.model
    if task and model.task != task:
        raise ValueError(f"{directory} is a {model.task} run; this command needs a {task} run")
    model.path = model_path or model.path
    model.load_in_4bit = model.load_in_4bit or load_in_4bit
    saved = (Path(directory) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(directory) if saved else model.path)
    return record, load_adapter(load_base(model), directory), tokenizer


def evaluate_trained(directory: str | os.PathLike, model_path: str | None = None,
                     dataset: str | None = None) -> dict[str, Any]:
    """A trained adapter's metrics on its run's evaluation data, or on all of `dataset`."""
    from .data import PadCollator
    from .trainers.objectives import evaluate, objective_for

    record, model, tokenizer = load_trained(directory, model_path)
    config = record.config
    config.data.eval_dataset = dataset or config.data.eval_dataset
    _, eval_set, sources = build_data(config, tokenizer, getattr(model.config, "max_position_embeddings", None),
                                      eval_only=True)
    print(f"scoring {len(eval_set)} examples of {sources[1]}")
    return evaluate(model, eval_set, PadCollator(tokenizer.pad_token_id), objective_for(model, eval_set[0]),
                    config.train.eval_batch_size)


def merged_trained(directory: str | os.PathLike, model_path: str | None = None, load_in_4bit: bool = False):
    """(base + adapter of a run merged in float32, tokenizer, whether the base was 4-bit: merged onto
    its dequantized weights, never re-quantized)."""
    import warnings

    from . import quant
    from .adapters.inject import merge

    _, model, tokenizer = load_trained(directory, model_path, load_in_4bit)
    four_bit = any(quant.is_4bit(m) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller says it once, plainly
        return merge(model), tokenizer, four_bit


def merge_trained(directory: str | os.PathLike, output_dir: str | os.PathLike, model_path: str | None = None,
                  load_in_4bit: bool = False, dtype: str = "float32") -> bool:
    """Save base + adapter of a run as one plain model with its tokenizer (and generation config),
    merged in float32 and cast once; True when the base was 4-bit."""
    import torch

    refuse_writing_over_inputs(output_dir, directory, model_path)
    merged, tokenizer, four_bit = merged_trained(directory, model_path, load_in_4bit)
    if dtype != "float32":  # transformers refuses .to(dtype) on a model loaded in 4-bit, even once merged
        merged = merged.to(getattr(torch, dtype))
    atomic_save(output_dir, lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return four_bit


def export_trained(directory: str | os.PathLike, output_dir: str | os.PathLike, as_format: str = "lora",
                   model_path: str | None = None, rank: int | None = None, outtype: str = "f16") -> str:
    """Write a run's adapter as a PEFT LoRA directory ("lora"), its merged model as one GGUF file
    ("gguf") or a llama.cpp LoRA adapter ("gguf-lora") in `output_dir`; returns what was written."""
    refuse_writing_over_inputs(output_dir, directory, model_path)
    if as_format == "gguf":
        from .gguf_export import write_gguf

        merged, tokenizer, _ = merged_trained(directory, model_path)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(output_dir) / f"model-{outtype}.gguf"
        kinds = write_gguf(merged, tokenizer, path, outtype)
        return f"merged model written as GGUF to {path} ({len(kinds)} tensors, {outtype}; norms and biases f32)"
    model = load_trained(directory, model_path)[1]
    if as_format == "gguf-lora":
        from .gguf_export import write_gguf_lora

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(output_dir) / "adapter-f32.gguf"
        errors = write_gguf_lora(model, path, rank=rank)
        where = f"{path} (llama-cli -m BASE.gguf --lora {path})"
    else:
        from .io import export_lora

        errors, where = export_lora(model, output_dir, rank=rank), output_dir
    return (f"exported {len(errors)} modules as LoRA to {where}; relative error ||BA - dW|| / ||dW||: "
            f"max {max(errors.values()):.2e}, mean {sum(errors.values()) / len(errors):.2e}")


def _saved_num_labels(directory: Path) -> int:
    """The class count of a saved classification head (modules_to_save), or 2."""
    from safetensors import safe_open

    path = directory / "adapter_model.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            heads = [k for k in f.keys() if k.endswith(("classifier.weight", "score.weight", "out_proj.weight"))]
            return f.get_slice(heads[0]).get_shape()[0] if heads else 2
    except Exception as e:  # safetensors' own message names no file
        raise ValueError(f"{path} cannot be read ({e}); the file is truncated or not safetensors") from None
