"""The LightningModule: cross-entropy, optimiser + scheduler from config, torchmetrics per split."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from cnnpipe.config import OptimConfig
from cnnpipe.training.distributed import scaled_lr


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimiser {cfg.name!r}")  # unreachable after config validation


class ImageClassifier(pl.LightningModule):
    """Wraps any logits-producing net; metrics are torchmetrics objects logged per epoch (DDP-correct)."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optim: OptimConfig,
        label_smoothing: float = 0.0,
        scale_lr: str = "none",
    ) -> None:
        super().__init__()
        self.net = net
        self.optim_cfg = optim
        self.scale_lr = scale_lr
        self.label_smoothing = label_smoothing
        # validate_args=False: the inputs are our own logits and labels; the checks cost ~0.1 ms per step.
        self.train_acc = MulticlassAccuracy(num_classes, validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, validate_args=False)
        self.val_f1 = MulticlassF1Score(num_classes, average="macro", validate_args=False)
        self._loss_sum: torch.Tensor | None = None
        self._seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        # Accumulate on the device and log once, at the epoch's last batch: Lightning's `self.log` costs ~1 ms
        # per call (bench/findings.md, B1), a third of a small step. No host sync either way.
        self.train_acc.update(logits, y)  # update only: the per-batch value of __call__ is never used
        n = y.shape[0]
        weighted = loss.detach() * n
        self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
        self._seen += n
        if self.trainer.is_last_batch:
            # Batch-weighted mean over this rank; ranks hold equal-sized shards, so the DDP mean is global.
            self.log("train/loss", self._loss_sum / self._seen, on_step=False, on_epoch=True, sync_dist=True)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._seen = None, 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.val_f1.update(logits, y)
        self.log(
            "val/loss",
            self._loss(logits, y),
            on_step=False,
            on_epoch=True,
            batch_size=y.shape[0],
            sync_dist=True,
        )
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True)
        self.log("val/f1_macro", self.val_f1, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        world_size = self._trainer.world_size if self._trainer is not None else 1
        lr = scaled_lr(self.optim_cfg.lr, world_size, self.scale_lr)
        optimizer = build_optimizer(self.parameters(), replace(self.optim_cfg, lr=lr))
        if self.optim_cfg.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=int(self.trainer.estimated_stepping_batches)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        if self.optim_cfg.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, self.trainer.max_epochs or 1)
            )
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        return optimizer
