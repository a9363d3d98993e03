"""`peftlab compare`: several methods trained on the same data, each sized to one parameter budget.

Every method sizes itself (`AdapterConfig.for_budget`) from the shapes of the modules it would
adapt, so the base model is loaded once; each run is a `peftlab train` in its own process, whose
peak memory is that process's own.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .adapters.inject import target_shapes
from .adapters.registry import get_method
from .io import refuse_overlap
from .recipes import resolve
from .run import RECORD_NAME, load_base


def budget_settings(methods: list[str], budget: int, overrides: list[str], options: dict[str, Any]) -> dict[str, dict]:
    """Each method's size settings whose final trainable count comes closest to `budget`."""
    config = resolve(methods[0], overrides=overrides, options=options)
    model = load_base(config.model)
    return {m: get_method(m).config.for_budget(target_shapes(model, m), budget) for m in methods}


def compare(methods: str, output_dir: Path, budget: int | None, overrides: list[str],
            options: dict[str, Any], cli_args: list[str]) -> dict[str, Any]:
    """Train every method of a comma-separated list (a subprocess each), then write compare.json and
    compare.png."""
    if any(o.partition("=")[0] == "output_dir" for o in overrides):
        raise ValueError("compare writes each method's run to OUTPUT_DIR/<method>: pass --output-dir, not output_dir=")
    methods = [get_method(m.strip()).name for m in methods.split(",") if m.strip()]
    refuse_overlap(output_dir, {"model": options.get("model.path", (None,))[0],
                                "dataset": options.get("data.dataset", (None,))[0]})
    sizing = budget_settings(methods, budget, overrides, options) if budget else {m: {} for m in methods}
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        run_dir = output_dir / method
        run_dir.mkdir(exist_ok=True)
        settings = [f"{k}={v}" for k, v in sizing[method].items()]
        print(f"== {method} {' '.join(settings)}", flush=True)
        cmd = [sys.executable, "-m", "peftlab.cli", "train", "--adapter", method, "--output-dir", str(run_dir),
               *cli_args, "disable_tqdm=true", *overrides, *settings]
        with open(run_dir / "train.log", "w") as log:  # a file, not a pipe: a full pipe would block the run
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage: its peak memory
        if status != 0:
            raise RuntimeError(f"training {method} failed; see {run_dir / 'train.log'}:\n"
                               f"{(run_dir / 'train.log').read_text()[-1500:]}")
        record = json.loads((run_dir / RECORD_NAME).read_text())
        result = record["result"]
        rows.append({"adapter": method, "eval_accuracy": result.get("eval_accuracy"), "eval_loss": result["eval_loss"],
                     "trainable": record["trainable_params"], "step_ms": round(1e3 * result["step_time"], 1),
                     "peak_rss_mib": round(usage.ru_maxrss / 1024), **sizing[method]})
    metric = "eval_accuracy" if all(r["eval_accuracy"] is not None for r in rows) else "eval_loss"
    table = {"metric": metric, "budget": budget, "rows": rows}
    (output_dir / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    plot(table, output_dir / "compare.png")
    return table


def text_table(table: dict[str, Any]) -> str:
    metric = table["metric"]
    lines = [f"\n{'adapter':<10} {metric:>13} {'trainable':>11} {'step ms':>8} {'peak MiB':>9}"]
    lines += [f"{r['adapter']:<10} {r[metric]:>13.4f} {r['trainable']:>11,} {r['step_ms']:>8} {r['peak_rss_mib']:>9}"
              for r in table["rows"]]
    return "\n".join(lines)


def plot(table: dict[str, Any], path: Path) -> None:
    """One dot per method on an axis fitted to the values (bars from 0 would hide a 9.35 vs 9.80
    loss gap), each labelled with its value and trainable count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, metric = table["rows"], table["metric"]
    values = [r[metric] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2.5, 3.5))
    ax.plot(range(len(rows)), values, "o", markersize=8)
    for i, (row, value) in enumerate(zip(rows, values)):
        ax.annotate(f"{value:.4g}\n{row['trainable']:,} params", (i, value), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=7)
    low, high = min(values), max(values)
    margin = max((high - low) * 0.35, abs(high) * 0.01, 1e-3)
    ax.set_ylim(low - margin, high + 2 * margin)
    ax.set_xticks(range(len(rows)), [r["adapter"] for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel(metric)
    budget = table["budget"]
    ax.set_title(f"same data, budget {budget:,} params" if budget else "same data")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
