#!/usr/bin/env bash
# Two processes with gloo DDP on a CPU-only machine (on GPUs drop --multi_gpu's caveat and use your
# accelerate config). Without a GPU, `accelerate launch --num_processes 2` alone starts ONE process;
# --multi_gpu makes it start two (torchrun), and peftlab's Trainer then runs gloo DDP.
set -euo pipefail
accelerate launch --multi_gpu --num_processes 2 "$(command -v peftlab)" train --adapter evalora \
    per_device_train_batch_size=8 --output-dir runs/evalora-2proc "$@"
