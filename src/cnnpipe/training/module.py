"""The LightningModule: cross-entropy (class-weighted with train.class_balance=loss), optimiser + scheduler from
config, torchmetrics per split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from cnnpipe.config import OptimConfig
from cnnpipe.data.online_augment import reseed
from cnnpipe.training.distributed import scaled_lr
from cnnpipe.training.optimizers import build_optimizer, parameter_groups

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # predicted classes, labels, mean loss of one batch


def summarise(outputs: list[Outputs]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """All predictions and labels of a pass, its summed loss (float64: the same sum whatever the memory
    layout) and sample count, without a host sync."""
    preds, targets, losses = zip(*outputs, strict=True)
    sizes = [len(t) for t in targets]
    weights = torch.tensor(sizes, dtype=torch.float64, device=losses[0].device)
    return torch.cat(preds), torch.cat(targets), (torch.stack(losses).double() * weights).sum(), sum(sizes)


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Class-weighted cross-entropy, one formula for hard labels, label smoothing and MixUp / CutMix soft targets:

        sum_i sum_c w_c t_ic (-log p_ic)  /  sum_i sum_c w_c t_ic

    with t_i the sample's target distribution (one-hot, smoothed (1 - eps) one-hot + eps / K, or timm's mixed
    targets). It is PyTorch's weighted cross-entropy over the batch as if each sample were split into hard-labelled
    fractions t_ic of class c, so a class's share counts with its class's weight: for one-hot targets exactly
    F.cross_entropy(logits, y, weight=w) (whose mean divides by sum_i w_{y_i}); a mixed target lam * a + (1 - lam) * b
    weighs the class-a term lam * w_a and the class-b term (1 - lam) * w_b. Not PyTorch's own combinations, whose
    normalisations disagree: with weight + label_smoothing it divides by sum_i w_{y_i} (leaving out the smoothed
    mass), with probability targets by the batch size; the same batch with smoothing folded into timm's targets
    and as hard labels (MixUp's odd last batch) would be scaled differently."""
    weight = weight.to(logits.dtype)  # a no-op, unless trainer.precision=bf16-true cast the module's buffers
    if not target.is_floating_point():
        if not label_smoothing:
            return F.cross_entropy(logits, target, weight=weight)
        classes = logits.shape[1]
        target = F.one_hot(target, classes).to(logits.dtype) * (1 - label_smoothing) + label_smoothing / classes
    target = target.to(logits.dtype)
    # An elementwise product, not `target @ weight`: autocast (bf16-mixed) would run the matmul in bfloat16.
    return F.cross_entropy(logits, target, weight=weight, reduction="sum") / (target * weight).sum()


class ImageClassifier(pl.LightningModule):
    """Wraps any logits-producing net; metrics are torchmetrics objects logged per epoch (DDP-correct).

    Manual optimisation, so that one Lightning iteration can take several optimiser steps: a training
    batch may hold up to `trainer.steps_per_call` consecutive batches of `batch_size`, each one a full
    step through Lightning's own `manual_backward` and `LightningOptimizer.step` (precision plugin, DDP
    reducer, per-step hooks, clipping after AMP unscaling). Lightning's fixed cost per iteration (~0.5 ms of
    loop bookkeeping) is then paid once per call instead of once per step: on 8x8 digits 0.97 of a raw
    loop instead of 0.88-0.92, within noise from 3x32x32 up (docs/design.md, "The training step"). The
    updates are those of one step per call (tests/test_fit.py and tests/test_ddp.py check the weights)."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optim: OptimConfig,
        label_smoothing: float = 0.0,
        scale_lr: str = "none",
        batch_size: int | None = None,
        grad_clip: float = 0.0,
        augment: nn.Module | None = None,
        mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        accumulate: int = 1,
        ema: float = 0.0,
        seed: int = 0,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = net
        self.augment = augment  # per-image batch augmentation on the device (data/online_augment.py), or None
        self.mixup = mixup  # timm's Mixup (MixUp / CutMix: soft targets), or None
        self.seed = seed  # each epoch's random draws start from (seed, epoch, rank): see on_train_epoch_start
        self.accumulate = accumulate  # optimiser step every `accumulate` batches
        self._micro = 0  # batches since the last optimiser step
        self._window = 1  # batches in the current accumulation window (an epoch's last may be shorter)
        self._seen = 0  # batches of this epoch so far
        # timm's weight average: validated, checkpointed and saved in place of the raw weights when on. A submodule,
        # so Lightning moves it with the model and the checkpoint carries it (resume keeps the average).
        self.ema: nn.Module | None = None
        if ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(net, decay=ema)
            self.ema.requires_grad_(False)  # never trained: DDP must not wait for its gradients
        self.optim_cfg = optim
        self.scale_lr = scale_lr
        self.label_smoothing = label_smoothing
        # train.class_balance=loss: one weight per class (fit.class_weights), or None (plain cross-entropy). Not a
        # buffer: trainer.precision=bf16-true casts buffers to bf16 (3 significant digits), and the run logs the
        # float32 values it trains with; moved to the device in on_fit_start. Not in checkpoints: derived from the
        # train labels, not learned, so a checkpoint stays loadable whatever the setting.
        self.class_weights = None if class_weights is None else class_weights.float()
        self.batch_size = batch_size  # None: every training batch is one step
        self.grad_clip = grad_clip
        # validate_args=False: the inputs are our own logits and labels; the checks cost ~0.1 ms per step.
        # Accuracy is micro (correct / all), as evaluate's test `acc`; torchmetrics' default would be macro.
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_f1 = MulticlassF1Score(num_classes, average="macro", validate_args=False)
        self._epoch: list[Outputs] = []  # this epoch's training steps
        self._val: list[Outputs] = []  # this validation pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_fit_start(self) -> None:
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(self.device)

    def evaluated_net(self) -> nn.Module:
        """What validation measures and what is saved: the weight average when `train.ema` is on."""
        return self.ema.module if self.ema is not None else self.net  # type: ignore[return-value]

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: class-weighted with train.class_balance=loss (`weighted_cross_entropy`), and so is
        train/loss then; val/loss never is (`validation_step`)."""
        if self.class_weights is not None:
            return weighted_cross_entropy(logits.float(), y, self.class_weights, self.label_smoothing)
        return self._plain_loss(logits, y)

    def _plain_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.is_floating_point():  # MixUp / CutMix soft targets, label smoothing already in them
            return F.cross_entropy(logits.float(), y)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        # Lightning's wrapper (counts global_step, runs the precision plugin); configure_optimizers returns one
        optimizer = cast(LightningOptimizer, self.optimizers())
        scheduler = cast(LRScheduler, self.lr_schedulers()) if self.optim_cfg.scheduler == "onecycle" else None
        if self.batch_size is None or labels.shape[0] <= self.batch_size:
            steps = [(images, labels)]
        else:
            steps = list(zip(images.split(self.batch_size), labels.split(self.batch_size), strict=True))
        last_call = self.trainer.is_last_batch
        for i, (x, y) in enumerate(steps):
            if self.augment is not None:
                x = self.augment(x)
            target = y
            if self.mixup is not None and len(y) % 2 == 0:  # timm's Mixup pairs images: an odd last batch goes as is
                x, target = self.mixup(x, y)
            logits = self(x)
            loss = self._loss(logits, target)
            if self._micro == 0:
                optimizer.zero_grad(set_to_none=True)
                self._window = self._window_size()
            self._micro += 1
            self._seen += 1
            # Each window's step is the mean over its batches, an epoch's short last window too (as timm's
            # train.py). Under DDP every backward all-reduces, also between accumulated steps: simple, correct.
            self.manual_backward(loss / self._window if self._window > 1 else loss)
            if self._micro == self._window or (last_call and i == len(steps) - 1):
                self._micro = 0
                optimizer.step()  # gradient clipping runs in on_before_optimizer_step, after AMP unscaling
                if scheduler is not None:
                    scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.net)  # type: ignore[operator]
            self._track(logits, y, loss)
        if self.trainer.is_last_batch:  # log before the callbacks' on_train_epoch_end reads the metrics
            self._log_train_epoch()
        return loss

    def _track(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        """Keep this epoch's predictions, labels and losses on the device; `_log_train_epoch` hands them to
        torchmetrics once. A per-step `update` (~0.4 ms) or `self.log` (~1 ms, bench/findings.md) would cost
        a tenth of a small step; appending costs microseconds and never syncs with the host."""
        self._epoch.append((logits.detach().argmax(1), y, loss.detach()))

    def _log_train_epoch(self) -> None:
        preds, targets, loss_sum, n = summarise(self._epoch)
        self._epoch = []
        # Ranks hold equal-sized training shards, so the DDP mean of the rank means is the global mean.
        # batch_size=1: one value per epoch, not to be re-weighted by the size of whatever batch came last.
        self.log("train/loss", (loss_sum / n).float(), on_step=False, on_epoch=True, sync_dist=True, batch_size=1)
        self.train_acc.update(preds, targets)  # class indices: the same statistics as from the logits
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def on_train_epoch_start(self) -> None:
        self._epoch = []
        self._micro = self._seen = 0
        # Every epoch's randomness (dropout, online augmentation, MixUp's numpy draws) starts from a seed of its
        # own, so a run resumed after epoch k trains epoch k+1 exactly as an uninterrupted run does.
        epoch_seed = (self.seed * 1_000_003 + self.current_epoch * 1_009 + self.global_rank) % 2**31
        torch.manual_seed(epoch_seed)
        np.random.seed(epoch_seed)
        if self.augment is not None:
            reseed(self.augment, epoch_seed)

    def _window_size(self) -> int:
        """Batches in the accumulation window starting now: `accumulate`, or what is left of the epoch."""
        if self.accumulate == 1:
            return 1
        per_epoch = getattr(self.trainer.train_dataloader, "steps_per_epoch", None)
        if per_epoch is None:
            return self.accumulate
        return max(1, min(self.accumulate, int(per_epoch) - self._seen))

    def on_train_epoch_end(self) -> None:
        if self.optim_cfg.scheduler == "cosine":  # per-epoch schedule; callbacks read the lr before this
            cast(LRScheduler, self.lr_schedulers()).step()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.evaluated_net()(x)
        # val/loss is never class-weighted: it picks checkpoints (tie-break), trials and prunes, so it must compare
        # across train.class_balance settings; val/f1_macro is what weighs every class equally.
        self._val.append((logits.argmax(1), y, self._plain_loss(logits, y)))

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        preds, targets, loss_sum, n = summarise(self._val)
        self._val = []
        # batch_size=n: Lightning sums value x n and n over the ranks, so val/loss is the mean over the whole
        # split even though the unpadded shards differ in size.
        self.log("val/loss", (loss_sum / n).float(), on_epoch=True, batch_size=n, sync_dist=True)
        self.val_acc.update(preds, targets)
        self.val_f1.update(preds, targets)
        self.log("val/acc", self.val_acc, on_epoch=True)
        self.log("val/f1_macro", self.val_f1, on_epoch=True)

    def configure_optimizers(self) -> Any:
        world_size = self._trainer.world_size if self._trainer is not None else 1
        lr = scaled_lr(self.optim_cfg.lr, world_size, self.scale_lr)
        groups = parameter_groups(self.net, self.optim_cfg, lr)
        optimizer = build_optimizer(groups, replace(self.optim_cfg, lr=lr))
        if self.optim_cfg.scheduler == "onecycle":
            max_lr = [group["lr"] for group in groups]  # per group: the backbone's stays a fraction of the head's
            onecycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=self._total_steps())
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": onecycle, "interval": "step"}}
        if self.optim_cfg.scheduler == "cosine":
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs or 1))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}
        return optimizer

    def _total_steps(self) -> int:
        """Optimiser steps in the whole fit. Lightning's estimate counts iterations, which are fewer when
        one call takes several steps; our batch iterables say how many steps an epoch has."""
        iterations = int(self.trainer.estimated_stepping_batches)  # also loads the train batches
        per_epoch = getattr(self.trainer.train_dataloader, "steps_per_epoch", None)
        if per_epoch is None or self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            return iterations
        return -(-int(per_epoch) // self.accumulate) * self.trainer.max_epochs  # an epoch's last window steps too
