"""TrainConfig: the training hyperparameters, under the names users know from transformers."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..adapters.base import check_finite, opt

# transformers' schedules (get_scheduler) that need nothing but the warm-up and the run length
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")
TRACKERS = ("auto", "none", "tensorboard", "wandb", "mlflow")


@dataclass(kw_only=True)
class TrainConfig:
    """Training hyperparameters; names follow transformers.TrainingArguments."""

    output_dir: str = opt("runs/peftlab", "where the adapter, checkpoints and metrics go")
    learning_rate: float = opt(2e-4, "peak learning rate")
    per_device_train_batch_size: int = opt(16, "examples per process per micro-batch")
    per_device_eval_batch_size: int = opt(64, "examples per process per eval batch")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    num_train_epochs: float = opt(3.0, "epochs to train (ignored when max_steps > 0)")
    max_steps: int = opt(-1, "optimizer steps to train; -1 = from num_train_epochs")
    warmup_ratio: float = opt(0.0, "fraction of steps with linear warm-up (when warmup_steps is 0)")
    warmup_steps: int = opt(0, "optimizer steps of linear warm-up; overrides warmup_ratio")
    lr_scheduler_type: str = opt("linear", f"one of {', '.join(SCHEDULES)}")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    optim: str = opt("adamw_torch", f"one of {', '.join(OPTIMIZERS)} (adamw_8bit: bitsandbytes 8-bit AdamW)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = no clipping")
    seed: int = opt(42, "seed for initialization, data order and dropout")
    logging_steps: int = opt(10, "log the training loss every N optimizer steps")
    eval_steps: int = opt(0, "evaluate every N optimizer steps; 0 = only at the end")
    save_steps: int = opt(0, "write a resumable checkpoint every N optimizer steps; 0 = none")
    save_total_limit: int = opt(2, "keep the newest N checkpoints; 0 = keep all")
    bf16: bool = opt(False, "bfloat16 autocast (needs hardware support)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (non-reentrant)")
    fsdp: bool = opt(False, "shard the frozen base across processes with FSDP2 (one unit per transformer block); "
                            "the adapter stays whole on every process. Needs a multi-process launch (torchrun)")
    torch_compile: bool = opt(False, "train through torch.compile (inductor; on CPU it needs a C++ compiler); "
                                     "fused adapter layers stay one opaque op inside the compiled graph")
    max_nonfinite_steps: int = opt(5, "stop after this many optimizer steps in a row with a NaN/inf loss or gradient")
    prepare_batches: int = opt(16, "training batches handed to the adapter's prepare() (EVA)")
    group_by_length: bool = opt(False, "batch examples of similar length together (less padding)")
    disable_tqdm: bool = opt(False, "no progress bars")
    overwrite_output_dir: bool = opt(False, "start a fresh run in an output_dir that holds an earlier run's "
                                            "checkpoints (they are deleted); without it that is an error")
    report_to: str = opt("auto", "where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow (comma-separated), "
                                 "none, or auto = tensorboard when it is installed")

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

        check_finite(self)
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "max_nonfinite_steps"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        for name in ("eval_steps", "save_steps", "save_total_limit", "warmup_steps", "prepare_batches"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        check(isinstance(self.max_steps, int) and (self.max_steps == -1 or self.max_steps >= 1),
              f"max_steps must be -1 (use num_train_epochs) or >= 1, got {self.max_steps!r}")
        check(self.max_steps > 0 or (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0),
              f"num_train_epochs must be > 0 when max_steps is -1, got {self.num_train_epochs!r}")
        check(math.isfinite(self.learning_rate) and self.learning_rate > 0,
              f"learning_rate must be > 0, got {self.learning_rate!r}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm!r}")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
              f"adam betas must be in [0, 1), got {self.adam_beta1!r}, {self.adam_beta2!r}")
        check(self.lr_scheduler_type in SCHEDULES,
              f"lr_scheduler_type must be one of {', '.join(SCHEDULES)}, got {self.lr_scheduler_type!r}")
        check(self.optim in OPTIMIZERS, f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
        trackers = self.report_to.split(",") if isinstance(self.report_to, str) else [self.report_to]
        check(all(t.strip() in TRACKERS for t in trackers) and (len(trackers) == 1 or not {"auto", "none"} & set(trackers)),
              f"report_to must be one of {', '.join(TRACKERS)} or a comma-separated list of trackers, got {self.report_to!r}")
        check(bool(self.output_dir), "output_dir must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def total_steps(self, micro_batches_per_epoch: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * micro_batches_per_epoch / self.gradient_accumulation_steps))

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)
