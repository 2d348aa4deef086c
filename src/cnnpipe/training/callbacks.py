"""Per-epoch history: one host sync per epoch to read metrics, print a progress line, feed sinks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from cnnpipe.console import info
from cnnpipe.errors import CnnpipeError

MetricSink = Callable[[dict[str, float], int], None]


class NonFiniteLoss(CnnpipeError):
    """Training diverged: the loss became NaN or infinite."""


class EpochHistory(Callback):
    """Collects `train/*`, `val/*` and the learning rate after each epoch (validation included) on
    global rank 0, prints one line, and passes the numbers to sinks (the MLflow run logger)."""

    def __init__(self, sinks: list[MetricSink] | None = None, stage: str = "train", quiet: bool = False) -> None:
        self.sinks = list(sinks or [])
        self.stage, self.quiet = stage, quiet
        self.rows: list[dict[str, float]] = []
        self._t0 = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        epoch = trainer.current_epoch + 1  # epochs count from 1 everywhere a user reads them: terminal, CSV, MLflow
        loss = metrics.get("train/loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLoss(f"train/loss is {loss} at epoch {epoch}: lower optim.lr or set train.grad_clip")
        if not trainer.is_global_zero:
            return
        if trainer.optimizers:
            metrics["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        metrics["epoch_time_s"] = time.monotonic() - self._t0
        self.rows.append({"epoch": epoch, **metrics})
        for sink in self.sinks:
            sink(metrics, epoch)
        if not self.quiet:
            shown = "  ".join(
                f"{k} {metrics[k]:.4f}" for k in ("train/loss", "val/loss", "val/acc", "val/f1_macro") if k in metrics
            )
            info(self.stage, f"epoch {epoch}/{trainer.max_epochs}  {shown}")
