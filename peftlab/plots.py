"""Plots of a finished run, drawn from its metrics.jsonl: loss.png (skipped non-finite steps marked),
and ranks.png for methods whose ranks change or are data-driven (a heatmap of every layer's rank
over training; layers that reached their rank ceiling are marked)."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_write
from .trainers.metrics import read_metrics


def plot_run(output_dir: str | Path) -> list[str]:
    """Write the plots of the run in `output_dir`; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(output_dir)
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        logged = [r for r in records if "skipped_steps" in r]
        skipped = [b["step"] for a, b in zip([{"skipped_steps": 0}] + logged, logged)
                   if b["skipped_steps"] > a["skipped_steps"]]
        if skipped:  # steps whose loss or gradient was NaN/inf: left out of the curve, marked here
            ax.plot(skipped, [min(r["loss"] for r in train)] * len(skipped), "x", color="red",
                    label=f"skipped non-finite steps ({logged[-1]['skipped_steps']})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)
        written.append("loss.png")
    ranked = [r for r in records if "ranks" in (r.get("report") or {})]
    if ranked:
        layers = list(ranked[-1]["report"]["ranks"])
        capped = set(ranked[-1]["report"].get("at_ceiling", []))
        grid = [[r["report"]["ranks"].get(name, 0) for r in ranked] for name in layers]
        fig, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(layers))))
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        labels = [n.replace("model.", "").replace("encoder.layer.", "L") + (" (at ceiling)" if n in capped else "")
                  for n in layers]
        ax.set_yticks(range(len(layers)), labels, fontsize=6)
        steps = [r["step"] for r in ranked]
        ticks = list(range(0, len(steps), max(1, len(steps) // 8)))
        ax.set_xticks(ticks, [steps[i] for i in ticks])
        ax.set_xlabel("optimizer step")
        fig.colorbar(image, ax=ax, label="rank")
        fig.tight_layout()
        atomic_write(out / "ranks.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)
        written.append("ranks.png")
    return written
