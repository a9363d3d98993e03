"""Where a run's numbers go: `metrics.jsonl` in the output directory (one series per run; a resumed
run drops what the interrupted one logged after its checkpoint) and Accelerate's trackers
(`report_to`: TensorBoard, W&B, MLflow)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..io import atomic_write

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def trackers(report_to: str) -> list[str] | None:
    """Accelerate trackers for `report_to`: 'auto' is TensorBoard when it is installed."""
    if report_to == "auto":
        report_to = "tensorboard" if any(map(_installed, TRACKER_PACKAGES["tensorboard"])) else "none"
    if report_to == "none":
        return None
    names = [name.strip() for name in report_to.split(",")]
    for name in names:
        if not any(_installed(p) for p in TRACKER_PACKAGES[name]):
            raise ValueError(f"report_to={name} needs the {TRACKER_PACKAGES[name][0]} package: pip install "
                             f"{TRACKER_PACKAGES[name][0]} (or report_to=none)")
    return names


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line torn by a crash is dropped (the others must parse)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number} is not valid JSON; the metrics file is damaged") from None
    return records


class MetricsLog:
    """metrics.jsonl and the trackers, written by the main process only."""

    def __init__(self, path: Path, accelerator: Any, config: dict[str, Any]):
        self.path, self.accelerator, self.config = path, accelerator, config

    def start(self, step: int) -> None:
        """A fresh run starts the file anew; a resumed one keeps what was logged up to `step`."""
        if self.accelerator.is_main_process:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step] if step else []
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        scalars = {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool))}
        self.accelerator.init_trackers("peftlab", config=scalars)

    def log(self, metrics: dict[str, Any], report: dict[str, Any] | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {**metrics, **({"report": report} if report else {})}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a torn last line is dropped when the run resumes (read_metrics)
            raise OSError(e.errno, f"could not write {self.path} ({e.strerror})") from None
        scalars = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=metrics["step"])
