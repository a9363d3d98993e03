"""Peak memory: peftlab vs HF PEFT for every method PEFT has, each run in a fresh process
(load, wrap, the method's own preparation, three training steps with its hooks, fused AdamW).
Reports the process's peak RSS and the bytes autograd keeps for backward in one step (exact).

    python benchmarks/memory.py                          # MiniLM, r=16, dropout 0.1
    python benchmarks/memory.py --model llama --load-in-4bit --methods lora
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from common import SETTINGS, base_model, batches, peft_config, peftlab_config

STEPS = 3


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for backward during `step()`'s forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(storages.values())


def measure_one(lib: str, method: str, model_name: str, load_in_4bit: bool, rank: int, dropout: float) -> dict:
    data = batches(model_name, STEPS + 1)
    model = base_model(model_name, load_in_4bit)
    if lib == "peftlab":
        import peftlab

        model = peftlab.wrap(model, method, **peftlab_config(method, rank, dropout, STEPS + 1))
        controller = peftlab.controller(model)
        controller.prepare(data)
        penalty = controller.penalty  # AdaLoRA's regularizer joins the loss, as PEFT's does in forward
        before, after = controller.before_optimizer_step, controller.after_optimizer_step
    else:
        import peft

        model = peft.get_peft_model(model, peft_config(method, model_name, rank, dropout, STEPS + 1))
        if method == "evalora":  # PEFT's EVA reads per-token labels only: hand it a classifier's batches without
            peft.initialize_lora_eva_weights(model, [{k: v for k, v in b.items() if k != "labels" or v.dim() > 1}
                                                     for b in data])
        penalty = lambda step: 0.0  # noqa: E731
        update = getattr(model.base_model, "update_and_allocate", None)  # AdaLoRA's budget step
        before, after = (lambda step: update(step)) if update else (lambda step: None), lambda step: None
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    saved = 0
    for step in range(STEPS):
        batch = data[step]
        saved = saved_bytes(lambda: model(**batch).loss + penalty(step))
        before(step)
        optimizer.step()
        after(step)
        optimizer.zero_grad(set_to_none=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": peak_kib / 1024, "saved_mib": saved / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SETTINGS), default="minilm")
    parser.add_argument("--methods", default="lora,evalora,adalora,randlora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("LIB", "METHOD"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.model, args.load_in_4bit, args.rank, args.dropout)))
        return
    batch, length, _ = SETTINGS[args.model]
    print(f"{args.model}{' 4-bit NF4' if args.load_in_4bit else ''}, batch {batch} x {length}, r={args.rank}, "
          f"dropout={args.dropout}, {STEPS} steps per fresh process")
    print("| method | peftlab peak RSS | PEFT peak RSS | peftlab saved for backward | PEFT saved for backward |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        row = {}
        for lib in ("peftlab", "peft"):
            command = [sys.executable, __file__, "--one", lib, method, "--model", args.model, "--rank", str(args.rank),
                       "--dropout", str(args.dropout)] + (["--load-in-4bit"] if args.load_in_4bit else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row[lib] = json.loads(out.strip().splitlines()[-1])
        print(f"| {method} | {row['peftlab']['peak_rss_mib']:.0f} MiB | {row['peft']['peak_rss_mib']:.0f} MiB | "
              f"{row['peftlab']['saved_mib']:.1f} MiB | {row['peft']['saved_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
