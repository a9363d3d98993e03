"""`peftlab ...`: train, keys, adapters, merge, export, eval, generate, compare. Argument parsing and
printing only; settings live in peftlab.recipes, runs in peftlab.run, the work in the library."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def _options(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """Settings given as the command's own options rather than key=value."""
    given = {"model.path": (args.model, "--model"), "data.dataset": (args.dataset, "--dataset"),
             "data.eval_dataset": (getattr(args, "eval_dataset", None), "--eval-dataset"),
             "train.output_dir": (getattr(args, "output_dir", None), "--output-dir"),
             "model.load_in_4bit": (getattr(args, "load_in_4bit", False) or None, "--load-in-4bit")}
    return {key: (value, flag) for key, (value, flag) in given.items() if value}


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a model with an adapter; with no --model/--dataset, the embedded sentiment demo.
    Settings are key=value (`peftlab keys` lists them, by section, with their defaults)."""
    from . import Trainer, trainable_summary
    from .recipes import resolve
    from .run import build_run, describe_run, record_run

    config = resolve(args.adapter, args.config, args.overrides, _options(args))
    run = build_run(config)
    if args.dry_run:
        print(describe_run(run))
        return 0
    trainer = Trainer(run.model, config.train, run.train_set, eval_dataset=run.eval_set, data_collator=run.collator)
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=args.resume)
    except KeyboardInterrupt:
        step = trainer.loop.step if trainer.loop else 0
        print(f"\npeftlab: interrupted at step {step}; resume with --resume (from the newest checkpoint-N, "
              f"which needs save_steps > 0)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if trainer.accelerator.is_main_process:
        result, written = record_run(run, result, time.perf_counter() - start)
        print_table({"adapter": config.method, **result, "trainable": trainable_summary(run.model)})
        print(f"written to {config.train.output_dir}: {', '.join(written)}")
    return 0


def print_table(values: dict[str, Any]) -> None:
    width = max(len(k) for k in values)
    lines = [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in values.items()]
    print("\n".join(["-" * (width + 30), *lines, "-" * (width + 30)]))


def cmd_keys(args: argparse.Namespace) -> int:
    """Every setting of a run, by section, with the value it resolves to for this adapter and task."""
    from .recipes import keys_table, resolve

    print(keys_table(resolve(args.adapter, overrides=[f"task={args.task}"])))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base model (float32 math) and save a plain model with its tokenizer."""
    from .run import merge_trained

    if merge_trained(args.adapter_dir, args.output_dir, args.model, args.load_in_4bit, args.dtype):
        print("note: the adapter was trained on a 4-bit base; merged onto the dequantized weights and saved "
              f"unquantized ({args.dtype}), never re-quantized, which would lose most of the update")
    print(f"merged model and tokenizer written to {args.output_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export any adapter: as a plain PEFT LoRA (exact for low-rank methods, else truncated SVD), as
    the merged model in one GGUF file, or as a llama.cpp LoRA adapter (GGUF) for the base's file."""
    from .run import export_trained

    print(export_trained(args.adapter_dir, args.output_dir, args.as_format, args.model, args.rank, args.outtype))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained adapter on its run's evaluation data, or on all of --dataset."""
    from .run import evaluate_trained

    print_table(evaluate_trained(args.adapter_dir, args.model, args.dataset))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a trained causal-LM adapter (its base loaded as trained, 4-bit too), through the
    tokenizer's chat template, streaming tokens; --interactive keeps a conversation going."""
    from .generate import converse
    from .run import load_trained

    if not (args.prompt or args.interactive):
        raise ValueError("pass --prompt TEXT, or --interactive for a conversation")
    record, model, tokenizer = load_trained(args.adapter_dir, args.model, task="causal-lm")
    converse(model, tokenizer, None if args.interactive else args.prompt, args.system, args.max_new_tokens, args.temperature)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train several methods on the same data at a matched parameter budget; table + plot."""
    from .compare import compare, text_table

    passed = [*(["--model", args.model] if args.model else []), *(["--dataset", args.dataset] if args.dataset else [])]
    options = {k: v for k, v in _options(args).items() if k != "train.output_dir"}
    print(text_table(compare(args.adapters, Path(args.output_dir), args.budget, args.overrides, options, passed)))
    print(f"written to {args.output_dir}: compare.json, compare.png, one run directory per adapter")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    """Print the methods: name, aliases, file type, recipe, one line on the method."""
    from .catalog import table

    print(table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning: seven adapters, "
                                     "one lifecycle. Settings are key=value; `peftlab keys` lists them.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (or PEFTLAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=f"example:\n  {example}")
        p.set_defaults(run=run)
        return p

    p = command("train", cmd_train, "fine-tune with an adapter",
                "peftlab train --adapter evalora r=16 learning_rate=5e-4 num_train_epochs=2\n"
                "  peftlab train --adapter lora --model ./my-llama --dataset data.jsonl task=causal-lm\n"
                "  peftlab keys --adapter lora --task causal-lm     # every key=value setting and its default")
    p.add_argument("--adapter", help="method name (lora, adalora, increlora, evalora, randlora, allora, sara); "
                                     "optional with --config, whose recipe names it")
    p.add_argument("--config", help="YAML recipe (default: the one peftlab ships for the adapter)")
    p.add_argument("--output-dir", help="where the adapter, checkpoints, metrics and plots go (default runs/<adapter>)")
    p.add_argument("--load-in-4bit", action="store_true", help="load the base in bitsandbytes NF4 (QLoRA)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in the output dir")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and the trainable-parameter line, then stop")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any adapter, model, data or training key")

    k = command("keys", cmd_keys, "list every key=value setting with its default", "peftlab keys --adapter adalora")
    k.add_argument("--adapter", default="lora", help="the method whose adapter keys to list (default lora)")
    k.add_argument("--task", default="seq-cls", help="seq-cls or causal-lm: the training defaults differ by task")

    p = command("compare", cmd_compare, "train several methods at a matched budget",
                "peftlab compare --adapters lora,evalora,adalora --budget 300000")
    p.add_argument("--adapters", required=True, help="comma-separated method names")
    p.add_argument("--budget", type=int, help="trainable adapter parameters each method is sized to (closest match)")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings applied to every run")
    for p in (sub.choices["train"], sub.choices["compare"]):
        p.add_argument("--model", help="model path or hub name (default: the packaged MiniLM)")
        p.add_argument("--dataset", help="a data file or hub dataset (default: the embedded sentiment task)")
        p.add_argument("--eval-dataset", help="evaluate on this data, whole (default: the dataset's held-out tail)")

    command("adapters", cmd_adapters, "list the adapter methods", "peftlab adapters")

    m = command("merge", cmd_merge, "merge an adapter into its base model", "peftlab merge runs/lora --output-dir merged/")
    m.add_argument("--load-in-4bit", action="store_true", help="load the base in 4-bit even if the run did not record it "
                   "(a run trained with --load-in-4bit is detected); the merge goes onto the dequantized weights")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved model (cast once, after merging in float32)")

    e = command("export", cmd_export, "export an adapter as a PEFT LoRA, or as GGUF for llama.cpp",
                "peftlab export runs/sara --as lora --rank 16 --output-dir sara-as-lora/\n"
                "  peftlab export runs/chat --as gguf --outtype q8_0 --output-dir gguf/")
    e.add_argument("--as", dest="as_format", choices=["lora", "gguf", "gguf-lora"], default="lora", help="lora: a "
                   "PEFT LoRA directory; gguf: the merged model in one file; gguf-lora: a llama.cpp LoRA adapter")
    e.add_argument("--rank", type=int, help="truncate to this rank (needed for full-rank methods: sara, randlora)")
    e.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="the GGUF weight type of --as gguf (default f16; norms and biases stay f32)")

    v = command("eval", cmd_eval, "evaluate a trained adapter", "peftlab eval runs/evalora")
    v.add_argument("--dataset", help="evaluate on all of this data instead")

    g = command("generate", cmd_generate, "generate text from a trained causal-LM adapter",
                'peftlab generate runs/chat --prompt "Name three uses of vinegar."')
    g.add_argument("--prompt", help="the user message")
    g.add_argument("--interactive", action="store_true", help="a conversation on the terminal")
    g.add_argument("--system", help="a system prompt (when the chat template has a system role)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    for p in (m, e, v, g):
        p.add_argument("adapter_dir", help="a run's output directory, or any adapter directory")
        p.add_argument("--model", help="base model (default: the one the run or adapter_config.json names)")
    for p in (m, e):
        p.add_argument("--output-dir", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before and after options; argparse alone keeps only the first run
    strays = [e for e in extra if e.startswith("-") or "=" not in e or args.command not in ("train", "compare")]
    if strays:
        settings = [k.replace("-", "_") + sep + v for k, sep, v in (s.lstrip("-").partition("=") for s in strays
                                                                   if s.startswith("--"))]
        hint = f"; settings are key=value, without dashes: {' '.join(settings)}" if settings else ""
        parser.error(f"unrecognized arguments: {' '.join(strays)}{hint}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    debug = args.debug or os.environ.get("PEFTLAB_DEBUG") == "1"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("\npeftlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # one line, naming the problem; the traceback only when asked for
        return _report(e, debug)
    finally:  # a launched run leaves its process group: gloo's threads otherwise race the interpreter's exit
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _report(e: Exception, debug: bool) -> int:
    """Exit 2 for bad input (a value, file or key the user gave), 1 for a failure while running."""
    import re

    from .settings import shorten

    bad_input = isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, IsADirectoryError,
                               NotADirectoryError, PermissionError, re.error))
    text = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
    if isinstance(e, OSError) and e.filename:
        text = f"{e.strerror or e}: {e.filename}"
    if debug:
        traceback.print_exc()
    print(f"peftlab: error: {shorten(text.strip() or type(e).__name__, 2000)}", file=sys.stderr)
    if not bad_input and not debug:
        print("(run with --debug for the traceback)", file=sys.stderr)
    return EXIT_BAD_INPUT if bad_input else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
