"""Helper script (not a test module): two 2-process DDP fits of the same tiny data on CPU (gloo): one step
per Lightning iteration, and `--per-call` steps per iteration. Lightning's DDP launcher re-executes this script
for rank 1; rank 0 writes both runs' weights, global steps, iterations and histories to `--out` (torch.save)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `tests` importable

from tests.tiny import tiny_config, tiny_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-call", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from cnnpipe.training.fit import fit

    torch.set_num_threads(1)
    meta, train, val = tiny_data(70)  # 35 per rank, batch 8: 5 steps per epoch, the last one of 3 images
    results = {}
    for per_call in (1, args.per_call):
        cfg = tiny_config(
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "train.epochs=3",
            "data.batch_size=8",
            f"trainer.steps_per_call={per_call}",
        )
        res = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True)
        results[per_call] = {
            "weights": {k: v.clone() for k, v in res.net.state_dict().items()},
            "global_step": res.trainer.global_step,
            "iterations": res.trainer.num_training_batches,
            "history": [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in res.history],
            "world_size": res.trainer.world_size,
        }
        if res.trainer.is_global_zero:
            torch.save(results, args.out)


if __name__ == "__main__":
    main()
