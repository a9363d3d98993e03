"""TrainConfig: the training hyperparameters, under the names users know from transformers."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..settings import Check, above, at_least, one_of, opt, validate, within

# transformers' schedules (get_scheduler) that need nothing but the warm-up and the run length
SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
OPTIMIZERS = ("adamw_torch", "adamw_8bit")
TRACKERS = ("auto", "none", "tensorboard", "wandb", "mlflow")
_TRACKER_LIST = Check(lambda v: all(t.strip() in TRACKERS for t in v.split(","))
                      and ("," not in v or not {"auto", "none"} & {t.strip() for t in v.split(",")}),
                      f"one of {', '.join(TRACKERS)} or a comma-separated list of trackers")


@dataclass(kw_only=True)
class TrainConfig:
    """Training hyperparameters; names follow transformers.TrainingArguments."""

    output_dir: str | None = opt(None, "where the adapter, checkpoints and metrics go (peftlab train: runs/<adapter>)")
    learning_rate: float = opt(2e-4, "peak learning rate", check=above(0))
    per_device_train_batch_size: int = opt(16, "examples per process per micro-batch", check=at_least(1))
    per_device_eval_batch_size: int | None = opt(None, "examples per process per eval batch; None = the training "
                                                       "batch size (evaluation then fits in the training peak)",
                                                 check=at_least(1))
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", check=at_least(1))
    num_train_epochs: float = opt(3.0, "epochs to train (ignored when max_steps > 0)", check=above(0))
    max_steps: int = opt(-1, "optimizer steps to train; -1 = from num_train_epochs",
                         check=Check(lambda v: v == -1 or v >= 1, "-1 (use num_train_epochs) or >= 1"))
    warmup_ratio: float = opt(0.0, "fraction of steps with linear warm-up (when warmup_steps is 0)", check=within(0, 1))
    warmup_steps: int = opt(0, "optimizer steps of linear warm-up; overrides warmup_ratio", check=at_least(0))
    lr_scheduler_type: str = opt("linear", f"one of {', '.join(SCHEDULES)}", check=one_of(*SCHEDULES))
    weight_decay: float = opt(0.0, "AdamW weight decay", check=at_least(0))
    adam_beta1: float = opt(0.9, "AdamW beta1", check=within(0, 1))
    adam_beta2: float = opt(0.999, "AdamW beta2", check=within(0, 1))
    adam_epsilon: float = opt(1e-8, "AdamW epsilon", check=above(0))
    optim: str = opt("adamw_torch", f"one of {', '.join(OPTIMIZERS)} (adamw_8bit: bitsandbytes 8-bit AdamW)",
                     check=one_of(*OPTIMIZERS))
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = no clipping", check=at_least(0))
    seed: int = opt(42, "seed for initialization, data order and dropout", check=within(0, 2 ** 32))
    logging_steps: int = opt(10, "log the training loss every N optimizer steps", check=at_least(1))
    do_eval: bool = opt(True, "evaluate on the eval data (at the end, and every eval_steps); false = never")
    eval_steps: int = opt(0, "evaluate every N optimizer steps; 0 = only at the end", check=at_least(0))
    save_steps: int = opt(0, "write a resumable checkpoint every N optimizer steps; 0 = none", check=at_least(0))
    save_total_limit: int = opt(2, "keep the newest N checkpoints; 0 = keep all", check=at_least(0))
    bf16: bool = opt(False, "bfloat16 autocast (needs hardware support)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (non-reentrant)")
    fsdp: bool = opt(False, "shard the frozen base across processes with FSDP2 (one unit per transformer block); "
                            "the adapter stays whole on every process. Needs a multi-process launch (torchrun)")
    torch_compile: bool = opt(False, "train through torch.compile (inductor; on CPU it needs a C++ compiler); "
                                     "fused adapter layers stay one opaque op inside the compiled graph")
    fast_dropout: bool = opt(True, "while training on CPU, the base model's own nn.Dropout layers draw their masks "
                                   "as peftlab's kernel does (4x cheaper, same distribution); put back afterwards")
    max_nonfinite_steps: int = opt(5, "stop after this many optimizer steps in a row with a NaN/inf loss or gradient",
                                   check=at_least(1))
    prepare_batches: int = opt(16, "training batches handed to the adapter's prepare() (EVA)", check=at_least(0))
    beta: float = opt(0.1, "DPO's β: how strongly the policy is held to the reference (task=dpo)", check=above(0))
    precompute_ref_log_probs: bool = opt(False, "DPO: score every training pair with the reference (the adapter off) "
                                                "once before training, instead of in every step")
    group_by_length: bool = opt(False, "batch examples of similar length together (less padding)")
    disable_tqdm: bool = opt(False, "no progress bars")
    overwrite_output_dir: bool = opt(False, "start a fresh run in an output_dir that holds an earlier run "
                                            "(its checkpoints and record are deleted); without it that is an error")
    report_to: str = opt("auto", "where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow (comma-separated), "
                                 "none, or auto = tensorboard when it is installed", check=_TRACKER_LIST)

    def __post_init__(self) -> None:
        validate(self, "TrainConfig")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def total_steps(self, micro_batches_per_epoch: int) -> int:
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * micro_batches_per_epoch / self.gradient_accumulation_steps))

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size
