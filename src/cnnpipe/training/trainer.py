"""Build the Lightning Trainer from config: no Lightning logger (MLflow is logged per epoch by our
callback), no per-step progress bar, no distributed sampler (our in-memory batches shard themselves)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from cnnpipe import threads
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


TIEBREAK = "val/loss"
# Scores closer than this are a tie (then the lower val/loss wins): float32 arithmetic gives a perfect accuracy as
# 1.0000001 in one run and 1.0 in another, and without it rounding noise picked the best epoch and the best trial.
TIE_TOLERANCE = 1e-6


def within_tie(a: float, b: float) -> bool:
    return abs(a - b) <= TIE_TOLERANCE


class BestCheckpoint(ModelCheckpoint):
    """Keeps the epoch best on `monitor`; a tie on it goes to the lower validation loss.

    On a small validation split `val/acc` saturates: the plain callback kept the first epoch to reach 1.0
    (epoch 5 of 30), while the run went on improving its loss (epoch 18 scored higher on test)."""

    def __init__(self, *args: Any, tiebreak: str = TIEBREAK, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tiebreak = tiebreak
        self.best_tiebreak = math.inf  # the tie-break value of the kept checkpoint

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None:
            return False
        logged = trainer.callback_metrics.get(self.tiebreak)
        loss = float(logged) if logged is not None else math.inf
        kept = self.best_k_models.get(self.kth_best_model_path) if self.best_k_models else None
        if kept is not None and self.monitor != self.tiebreak and within_tie(float(current), float(kept)):
            better = trainer.strategy.reduce_boolean_decision(bool(loss < self.best_tiebreak))
        else:
            better = super().check_monitor_top_k(trainer, current)
        if better:
            self.best_tiebreak = loss
        return better

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tiebreak": self.best_tiebreak}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_tiebreak = state_dict.get("best_tiebreak", math.inf)


def checkpoint_callbacks(cfg: Config, ckpt_dir: Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """`best.ckpt` (best on `train.monitor`, ties to the lower `val/loss`) and `last.ckpt` (every epoch, what a
    resume continues from). Two callbacks, because Lightning 2.6's `save_last=True` rewrites last.ckpt only in
    epochs where the best one improved: a resume would then repeat every epoch since the last improvement."""
    best = BestCheckpoint(
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


# DDP strategies and their variant that expects parameters without gradients (Lightning's registered names).
FIND_UNUSED = {
    "ddp": "ddp_find_unused_parameters_true",
    "ddp_spawn": "ddp_spawn_find_unused_parameters_true",
    "auto": "ddp_find_unused_parameters_true",  # auto with several processes is DDP
}


def resolve_strategy(cfg: Config) -> str:
    """trainer.strategy; with several processes and `model.freeze_epochs`, its DDP told to expect unused parameters:
    FreezeBackbone freezes after DDP wrapped the model (so that DDP synchronises the backbone once unfrozen), and
    plain DDP fails on the first backward of a frozen parameter. Still DDP, the same updates: only its gradient
    bookkeeping differs. Printed, and tagged on the run (cnnpipe.strategy), when it differs from the config."""
    processes = cfg.trainer.devices * cfg.trainer.num_nodes
    if cfg.model.freeze_epochs and processes > 1 and cfg.trainer.strategy in FIND_UNUSED:
        return FIND_UNUSED[cfg.trainer.strategy]
    return cfg.trainer.strategy


def build_trainer(
    cfg: Config, callbacks: list[Callback], max_epochs: int | None = None, root_dir: Path | None = None
) -> pl.Trainer:
    threads.apply(cfg)  # trainer.threads, else OMP_NUM_THREADS, else the cores shared out (cnnpipe.threads)
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
        strategy=resolve_strategy(cfg),
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
