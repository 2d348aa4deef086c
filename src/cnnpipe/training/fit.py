"""Fit a model on in-memory splits and return the best weights (shared by train and, later, sweep)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from cnnpipe.config import Config
from cnnpipe.data.datamodule import InMemoryDataModule
from cnnpipe.data.store import Split
from cnnpipe.models.factory import build_model, model_spec
from cnnpipe.training.callbacks import EpochHistory, MetricSink
from cnnpipe.training.module import ImageClassifier
from cnnpipe.training.trainer import build_trainer, checkpoint_callback


@dataclass
class FitResult:
    net: nn.Module
    spec: dict[str, Any]
    history: list[dict[str, float]]
    best_score: float | None
    best_epoch: int | None
    trainer: pl.Trainer = field(repr=False)


def fit(
    cfg: Config,
    meta: dict[str, Any],
    train: Split,
    val: Split,
    ckpt_dir: Path,
    sinks: list[MetricSink] | None = None,
    callbacks: list[Callback] | None = None,
    quiet: bool = False,
) -> FitResult:
    """Seed once, train for `train.epochs`, then load the checkpoint that was best on `train.monitor`.
    With `ckpt_dir=None` (sweep trials) nothing is written and the final weights are returned."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = model_spec(cfg.model, meta)
    module = ImageClassifier(build_model(spec), len(spec["classes"]), cfg.optim, cfg.train.label_smoothing)
    data = InMemoryDataModule(train, val, cfg.data.batch_size, cfg.seed)
    history = EpochHistory(sinks, quiet=quiet)
    ckpt = None
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt = checkpoint_callback(cfg, ckpt_dir)
    trainer = build_trainer(cfg, [history, *([ckpt] if ckpt else []), *(callbacks or [])], root_dir=ckpt_dir)
    trainer.fit(module, datamodule=data)
    best_score = best_epoch = None
    if ckpt is not None and ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        best_score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
        best_epoch = int(state.get("epoch", -1))
    return FitResult(module.net.cpu().eval(), spec, history.rows, best_score, best_epoch, trainer)
