"""A small, deterministic training job that tests run in subprocesses (kill/resume, accelerate launch).

    python tests/train_job.py OUT [--method lora] [--per-device 4] [--kill-at N] [--resume]
"""
import argparse
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import peftlab  # noqa: E402
from conftest import tiny_llama  # noqa: E402


def lm_dataset(n: int = 32, length: int = 12, seed: int = 0, num_starts: int = 80) -> list[dict]:
    """Counting sequences with a random start: learnable, fixed length (no padding effects)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, num_starts, (n,), generator=gen)
    rows = []
    for s in starts.tolist():
        ids = torch.arange(s, s + length) % 96
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids})
    return rows


JOB_CONFIGS = {
    "lora": {"r": 4, "lora_dropout": 0.1},
    "adalora": {"init_r": 6, "target_r": 2, "lora_dropout": 0.1},
    "increlora": {"init_r": 1, "target_r": 3, "top_h": 4, "lora_dropout": 0.1},
    "evalora": {"r": 4, "lora_dropout": 0.1},
    "randlora": {"r": 8, "randlora_alpha": 16.0},
    "allora": {"r": 4},
    "sara": {"target_fraction": 0.1},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--per-device", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ga", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    config = dict(JOB_CONFIGS[args.method])  # scheduled methods take the run length from the Trainer
    if "lora_dropout" in config:
        config["lora_dropout"] = args.dropout
    model = peftlab.wrap(tiny_llama(), args.method, **config)
    config = peftlab.TrainConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.per_device,
                                 gradient_accumulation_steps=args.ga, learning_rate=5e-3, save_steps=2,
                                 save_total_limit=0, logging_steps=1, warmup_steps=2, disable_tqdm=True, seed=7)
    trainer = peftlab.Trainer(model, config, lm_dataset(), eval_dataset=lm_dataset(8, seed=1))
    if args.kill_at:
        hook = trainer.controller.after_optimizer_step

        def after(step):
            hook(step)
            if step + 1 == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a real crash

        trainer.controller.after_optimizer_step = after
    print(trainer.train(resume_from_checkpoint=args.resume))
    rank = trainer.accelerator.process_index  # every process's view of the controller, for the tests
    with open(os.path.join(args.out, f"report_{rank}.json"), "w") as f:
        json.dump(trainer.controller.report(), f, sort_keys=True)


if __name__ == "__main__":
    main()
