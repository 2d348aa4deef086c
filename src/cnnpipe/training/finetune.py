"""Freeze the transferred backbone for the first `model.freeze_epochs` epochs (Lightning's BaseFinetuning).

All parameters stay in the optimiser from the start: frozen ones get no gradient, so the optimiser skips
them, and unfreezing needs no new param group — which keeps OneCycle and cosine schedules valid.

The freeze happens at fit start, after the strategy wrapped the model, not in `setup` as BaseFinetuning does:
DDP registers only the parameters that need gradients when it wraps, so a backbone frozen before the wrap is
never synchronised once unfrozen (each rank would train its own). DDP is told to expect the frozen parameters
(training/trainer.py, `resolve_strategy`)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from cnnpipe.console import info
from cnnpipe.models.transfer import backbone_modules


def _net(pl_module: pl.LightningModule) -> nn.Module:
    """The module's network (`ImageClassifier.net`; an nn.Module attribute reads as Tensor | Module to a checker)."""
    net = pl_module.net
    if not isinstance(net, nn.Module):
        raise TypeError(f"{type(pl_module).__name__}.net is not a torch module")
    return net


class FreezeBackbone(BaseFinetuning):
    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.epochs = epochs
        self.unfrozen = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing yet: see the module docstring (freezing here would hide the backbone from DDP)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.freeze_before_training(pl_module)
        super().on_fit_start(trainer, pl_module)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(backbone_modules(_net(pl_module)), train_bn=False)
        self.unfrozen = False

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """At the first epoch past the frozen ones: a resumed run starting later (frozen again by
        `freeze_before_training` at fit start) unfreezes at its first epoch, not never."""
        if epoch >= self.epochs and not self.unfrozen:
            self.make_trainable(backbone_modules(_net(pl_module)))
            self.unfrozen = True
            if pl_module.trainer.is_global_zero:  # one line, not one per DDP rank
                info("train", f"epoch {epoch + 1}: backbone unfrozen")
