"""Build the Lightning Trainer from config: no Lightning logger (MLflow is logged per epoch by our
callback), no per-step progress bar, no distributed sampler (our in-memory batches shard themselves)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from cnnpipe.config import Config


def resolve_precision(cfg: Config) -> str:
    """auto: bf16 mixed precision on a CUDA GPU that supports it, full fp32 elsewhere."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def use_channels_last(cfg: Config) -> bool:
    if cfg.trainer.channels_last != "auto":
        return cfg.trainer.channels_last == "on"
    return cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def checkpoint_callbacks(cfg: Config, ckpt_dir: Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """`best.ckpt` (best on `train.monitor`) and `last.ckpt` (every epoch, what a resume continues from).
    Two callbacks, because Lightning 2.6's `save_last=True` rewrites last.ckpt only in epochs where the
    best one improved: a resume would then repeat every epoch since the last improvement."""
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor=cfg.train.monitor,
        mode=cfg.train.monitor_mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1, enable_version_counter=False
    )
    return best, last


def build_trainer(
    cfg: Config, callbacks: list[Callback], max_epochs: int | None = None, root_dir: Path | None = None
) -> pl.Trainer:
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    callbacks = list(callbacks)
    if cfg.train.early_stopping_patience:
        callbacks.append(
            EarlyStopping(
                monitor=cfg.train.monitor,
                mode=cfg.train.monitor_mode,
                patience=cfg.train.early_stopping_patience,
            )
        )
    return pl.Trainer(
        max_epochs=max_epochs or cfg.train.epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=resolve_precision(cfg),  # type: ignore[arg-type]
        deterministic=cfg.train.deterministic,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(root_dir) if root_dir else None,
    )
