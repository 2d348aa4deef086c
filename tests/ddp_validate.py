"""Helper script (not a test module): validate saved weights on the val split with Lightning, on
`--devices` CPU processes. Lightning's DDP launcher re-executes this script per rank; rank 0 writes
the metrics as JSON. Used by tests/test_ddp.py to compare DDP with a single process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from cnnpipe.config import load_config
from cnnpipe.data.datamodule import InMemoryDataModule
from cnnpipe.data.store import load_split
from cnnpipe.models.store import load_model
from cnnpipe.training.module import ImageClassifier


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    net, spec = load_model(args.models)
    module = ImageClassifier(
        net, len(spec["classes"]), load_config(["train.hparams=params"], root=Path(__file__).resolve().parents[1]).optim
    )
    val = load_split(args.prepared / "val.npz")
    data = InMemoryDataModule(val, val, batch_size=32, seed=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    if trainer.is_global_zero:
        args.out.write_text(json.dumps({k: float(v) for k, v in metrics.items()}))


if __name__ == "__main__":
    sys.exit(main())
