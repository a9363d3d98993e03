"""End to end: `peftlab train` against transformers.Trainer + PEFT on the same data and
hyperparameters (the LoRA recipe on the embedded sentiment task, MiniLM), alternated round by
round in one process. Prints the training wall time (model loaded, data tokenized, no evaluation
inside) and the accuracy on the held-out split, measured by one shared evaluation loop, and the
floor: the frozen base alone (forward plus activation gradients, no adapters, no optimizer) over
peftlab's batches. PEFT's time over the floor is the most any adapter library could gain.

    python benchmarks/end_to_end.py --rounds 3
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time

import torch

import peftlab
from peftlab.data import EpochBatches
from peftlab.recipes import RunConfig, resolve
from peftlab.run import build_run


def settings(method: str) -> RunConfig:
    return resolve(method, overrides=["eval_steps=0", "disable_tqdm=true",
                                      f"output_dir={tempfile.mkdtemp(prefix='peftlab-e2e-')}"])


@torch.no_grad()
def accuracy(model: torch.nn.Module, features: list[dict], collate) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(features), 64):
        batch = collate(features[i:i + 64])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(features)


def run_peftlab(config: RunConfig) -> tuple[float, float]:
    run = build_run(config)
    model, train_set, eval_set, train_config, collator = run.model, run.train_set, run.eval_set, config.train, run.collator
    trainer = peftlab.Trainer(model, train_config, train_set, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, accuracy(model, eval_set, collator)


def run_floor(config: RunConfig) -> tuple[float, None]:
    run = build_run(config)
    model, train_set, train_config, collator = run.model, run.train_set, config.train, run.collator
    peftlab.unwrap(model)
    model.requires_grad_(False)
    # gradients flow back to the embeddings' output, as they do through an adapted model
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    batches = EpochBatches(len(train_set), train_config.per_device_train_batch_size, 1, 0, train_config.seed)
    every_batch = (indices for epoch in itertools.count() for indices in batches.epoch(epoch))
    model.train()
    start = time.perf_counter()
    for indices in itertools.islice(every_batch, train_config.total_steps(len(batches))):
        model(**collator([train_set[i] for i in indices])).loss.backward()
    return time.perf_counter() - start, None


def run_hf(config: RunConfig) -> tuple[float, float]:
    import peft
    from transformers import Trainer, TrainingArguments

    run = build_run(config)  # the same base, data, seed
    model, train_set, eval_set, train_config, collator = run.model, run.train_set, run.eval_set, config.train, run.collator
    peftlab.unwrap(model)
    adapter = config.adapter_config
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=adapter["r"], lora_alpha=adapter["lora_alpha"], lora_dropout=adapter["lora_dropout"],
        target_modules="all-linear", task_type="SEQ_CLS"))
    t = train_config
    steps = t.total_steps(math.ceil(len(train_set) / t.per_device_train_batch_size))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-e2e-"), learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs, per_device_train_batch_size=t.per_device_train_batch_size,
        warmup_steps=t.warmup(steps), lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, seed=t.seed, eval_strategy="no",
        save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, accuracy(model, eval_set, collator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", help="a recipe PEFT has too: lora")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    run = settings(args.method)
    runners = {"peftlab train": run_peftlab, "transformers.Trainer + PEFT": run_hf,
               "floor (frozen base alone)": run_floor}
    results: dict[str, list[tuple[float, float | None]]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            results[name].append(runner(run))
    print(f"{args.method} recipe on the embedded task ({run.adapter_config}), {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| run | median wall time | accuracies |\n|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | {statistics.median(r[0] for r in rows):.1f} s | "
              f"{', '.join(f'{100 * r[1]:.1f}%' for r in rows if r[1] is not None) or '-'} |")
    ours, theirs, floor = (statistics.median(r[0] for r in rows) for rows in results.values())
    print(f"transformers.Trainer + PEFT / peftlab train wall time: {theirs / ours:.2f}x "
          f"(a zero-cost adapter and optimizer would reach {theirs / floor:.2f}x)")


if __name__ == "__main__":
    main()
