"""Helper script (not a test module): a 2-process DDP fine-tune (CPU, gloo) of a timm network from a weights file,
backbone frozen for the first epoch, weight EMA on. Lightning's DDP launcher re-executes this script for rank 1;
each rank writes its raw and averaged weights to `--out`/rank<N>.pt (torch.save)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: make `tests` importable

from tests.tiny import photo_data, tiny_config  # noqa: E402

ARCH = "test_resnet.r160_in1k"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from cnnpipe.training.fit import fit

    torch.set_num_threads(1)
    meta, split, _ = photo_data(36)
    cfg = tiny_config(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "model=timm",
        f"model.arch={ARCH}",
        f"model.weights={args.weights}",
        "model.freeze_epochs=1",
        "data.channels=3",
        "data.image_size=20",
        "data.batch_size=6",
        "train.epochs=2",
        "train.ema=0.9",
    )
    res = fit(cfg, meta, split, split, ckpt_dir=None, quiet=True)
    module = res.trainer.lightning_module
    torch.save(
        {
            "raw": {k: v.detach().cpu().clone() for k, v in module.net.state_dict().items()},
            "ema": {k: v.detach().cpu().clone() for k, v in res.net.state_dict().items()},
            "world_size": res.trainer.world_size,
            "strategy_kwargs": getattr(res.trainer.strategy, "_ddp_kwargs", {}),
        },
        args.out / f"rank{res.trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
