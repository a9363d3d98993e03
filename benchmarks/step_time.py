"""Median training-step time: peftlab vs HF PEFT vs the frozen base (the floor), same batches,
same plain loop (forward, backward, fused AdamW step), every variant built once and their steps
alternated round by round in one process, so machine noise hits all of them alike.

    python benchmarks/step_time.py                                   # MiniLM, LoRA, dropout 0.1, + compiled
    python benchmarks/step_time.py --dropout 0 --methods lora,randlora
    python benchmarks/step_time.py --model llama --load-in-4bit --rank 16 --dropout 0   # QLoRA
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from common import SETTINGS, base_model, batches, peft_config, peftlab_config


class Variant:
    def __init__(self, name: str, model: torch.nn.Module, floor: bool = False, compiled: bool = False):
        self.name, self.model, self.floor = name, model.train(), floor
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
        self.run = torch.compile(model, options={"fallback_random": True}) if compiled else model
        self.times: list[float] = []
        # a peftlab method's regularizer joins the loss (PEFT adds AdaLoRA's inside forward)
        self.penalty = model.peftlab.current.controller.penalty if hasattr(model, "peftlab") else (lambda step: 0.0)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        if self.floor:  # forward plus activation gradients, no parameter gradients
            inputs = self.model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
            rest = {k: v for k, v in batch.items() if k != "input_ids"}
            self.run(inputs_embeds=inputs, **rest).loss.backward()
        else:
            (self.run(**batch).loss + self.penalty(0)).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


FAST_DROPOUT = contextlib.ExitStack()  # held for the benchmark's lifetime


def variants(args) -> list[Variant]:
    import peft

    import peftlab

    out = [Variant("floor (frozen base)", base_model(args.model, args.load_in_4bit).requires_grad_(False),
                   floor=True)]
    def ours(method: str, fast_dropout: bool = False) -> torch.nn.Module:
        model = peftlab.wrap(base_model(args.model, args.load_in_4bit), method,
                             **peftlab_config(method, args.rank, args.dropout, 10_000))
        # the base model's own dropout stays torch's unless asked (peftlab.Trainer's fast_dropout), so the
        # floor is the same for everyone
        if fast_dropout:
            FAST_DROPOUT.enter_context(peftlab.kernels.fast_dropout(model))
        return model

    for method in args.methods.split(","):
        out.append(Variant(f"peftlab {method}", ours(method)))
        if args.compile:
            out.append(Variant(f"peftlab {method} compiled", ours(method), compiled=True))
        if args.fast_dropout:
            out.append(Variant(f"peftlab {method} + fast base dropout", ours(method, fast_dropout=True)))
        theirs = peft_config(method, args.model, args.rank, args.dropout, 10_000)
        out.append(Variant(f"peft {method}", peft.get_peft_model(base_model(args.model, args.load_in_4bit), theirs)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="minilm")
    parser.add_argument("--methods", default="lora", help="comma-separated: lora, randlora")
    parser.add_argument("--rank", type=int, help="default: 32 for minilm, 16 for llama")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--load-in-4bit", action="store_true", help="NF4 base through bitsandbytes (QLoRA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time peftlab under torch.compile (inductor)")
    parser.add_argument("--fast-dropout", action="store_true",
                        help="also time peftlab with the base model's dropout drawn by peftlab's FastDropout")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compiles)")
    args = parser.parse_args()
    args.rank = args.rank or SETTINGS[args.model][2]
    data = batches(args.model)
    runs = variants(args)
    for run in runs:
        for i in range(args.warmup):
            run.step(data[i % len(data)])
    for _ in range(args.rounds):
        for run in runs:
            run.times += [run.step(data[i % len(data)]) for i in range(args.steps)]

    batch, length, _ = SETTINGS[args.model]
    floor = statistics.median(runs[0].times)
    print(f"{args.model}{' 4-bit NF4' if args.load_in_4bit else ''}, batch {batch} x {length}, r={args.rank}, "
          f"dropout={args.dropout}, {args.rounds} x {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| variant | median step | x floor | overhead vs PEFT's |\n|---|---|---|---|")
    for run in runs:
        median = statistics.median(run.times)
        method = run.name.split()[1] if run.name.startswith("peft") else None
        peft_median = statistics.median(next(r for r in runs if r.name == f"peft {method}").times) if method else None
        relative = f"{(median - floor) / (peft_median - floor):.2f}" if method and run.name.startswith("peftlab") else ""
        print(f"| {run.name} | {median * 1e3:.1f} ms | {median / floor:.2f} | {relative} |")
    for run in runs:
        if run.name.endswith("compiled"):
            peft_run = next(r for r in runs if r.name == f"peft {run.name.split()[1]}")
            print(f"{run.name} / {peft_run.name} eager step: "
                  f"{statistics.median(run.times) / statistics.median(peft_run.times):.2f}x")


if __name__ == "__main__":
    main()
