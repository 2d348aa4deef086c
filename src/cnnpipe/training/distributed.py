"""Which process am I, before the Trainer exists — so only global rank 0 opens an MLflow run and writes
outputs. Lightning's DDP launcher re-executes the script per device (children get LOCAL_RANK, NODE_RANK);
torchrun sets RANK; SLURM sets SLURM_PROCID. `fit` cross-checks this against `trainer.global_rank`."""

from __future__ import annotations

import math
import os


def launch_rank(devices: int) -> int:
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    if "LOCAL_RANK" in env:
        return node * devices + int(env["LOCAL_RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    return node * devices


def scaled_lr(lr: float, world_size: int, rule: str) -> float:
    """`data.batch_size` is per device, so the global batch grows with the world size; `linear` or `sqrt`
    scales the learning rate to match (Goyal et al. 2017; Krizhevsky 2014)."""
    if rule == "linear":
        return lr * world_size
    if rule == "sqrt":
        return lr * math.sqrt(world_size)
    return lr
