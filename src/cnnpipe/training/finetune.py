"""Freeze the transferred backbone for the first `model.freeze_epochs` epochs (Lightning's BaseFinetuning).

All parameters stay in the optimiser from the start: frozen ones get no gradient, so the optimiser skips
them, and unfreezing needs no new param group — which keeps OneCycle and cosine schedules valid."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer

from cnnpipe.console import info
from cnnpipe.models.transfer import backbone_modules


class FreezeBackbone(BaseFinetuning):
    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(backbone_modules(pl_module.net), train_bn=False)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch == self.epochs:
            self.make_trainable(backbone_modules(pl_module.net))
            info("train", f"epoch {epoch + 1}: backbone unfrozen")
