"""LightningDataModule over prepared splits: in memory on the training device when they fit, else
streamed by a DataLoader from the memory-mapped files (data/streaming.py)."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from cnnpipe.data.batches import IndexBatches, TensorBatches
from cnnpipe.data.store import Split
from cnnpipe.data.streaming import LoaderBatches, SplitDataset, to_float_images


def available_host_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def keep_on_device(policy: str, device: torch.device, nbytes: int) -> bool:
    """Whether the splits are held whole on the training device (`always`), streamed by a DataLoader
    (`never`), or (`auto`) held when they take under a quarter of the device's free memory — the rest
    is left for activations (on the CPU: under a quarter of the host's available memory)."""
    if policy in ("always", "never"):
        return policy == "always"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < free // 4
    if device.type == "cpu":
        available = available_host_memory()
        return available is None or nbytes < available // 4
    return True


class InMemoryDataModule(pl.LightningDataModule):
    """Train and val splits as uint8 arrays. Held on the device: batched by indexing. Otherwise:
    DataLoader workers read batches from the files, and they become floats on the device.
    `balance_classes` (train.class_balance=sampler): each training epoch is a class-balanced draw with
    replacement (`IndexBatches`), on both paths; validation order is unchanged."""

    def __init__(
        self,
        train: Split,
        val: Split,
        batch_size: int,
        seed: int,
        channels_last: bool = False,
        on_device: str = "auto",
        steps_per_call: int = 1,
        workers: int = 2,
        balance_classes: bool = False,
    ) -> None:
        super().__init__()
        self.train_split, self.val_split = train, val
        self.batch_size, self.seed, self.channels_last, self.on_device = batch_size, seed, channels_last, on_device
        self.steps_per_call, self.workers, self.balance_classes = steps_per_call, workers, balance_classes
        self.held_on_device: bool | None = None  # decided once per run, in setup()

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def setup(self, stage: str) -> None:
        """Hold both splits on the device or stream both: one decision, before either is placed (the free
        memory a second look would see already has the first split in it)."""
        nbytes = self.train_split.images.nbytes + self.val_split.images.nbytes
        self.held_on_device = keep_on_device(self.on_device, self._device(), nbytes)

    def _batches(self, split: Split, shuffle: bool) -> TensorBatches | LoaderBatches:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # Drop a ragged last training batch only when it could be a single sample (BatchNorm needs 2).
        drop_last = shuffle and (len(split.labels) // max(world, 1)) % self.batch_size == 1
        # Several steps per iteration under DDP too: Lightning prepares DDP's reducer before every
        # manual_backward, so each step's gradients are all-reduced (tests/test_ddp.py checks the weights).
        per_call = self.steps_per_call if shuffle else 1
        balance = torch.from_numpy(np.array(split.labels, dtype=np.int64)) if shuffle and self.balance_classes else None
        index = IndexBatches(
            len(split.labels),
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=drop_last,
            rank=rank,
            world_size=world,
            steps_per_call=per_call,
            epoch_of=(lambda: trainer.current_epoch) if trainer is not None else None,
            balance_labels=balance,
        )
        if self.held_on_device is None:
            self.setup("fit")  # used without a Trainer
        if not self.held_on_device:
            pin = self._device().type == "cuda"
            return LoaderBatches(SplitDataset(split), index, self.workers, pin_memory=pin)
        images = torch.from_numpy(np.array(split.images))  # a copy: the split may be a read-only memory map
        labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
        if self.channels_last:  # stored NHWC once, so every indexed batch already is
            images = images.contiguous(memory_format=torch.channels_last)
        return TensorBatches(images, labels, index).to(self._device())

    def train_dataloader(self) -> TensorBatches | LoaderBatches:
        return self._batches(self.train_split, shuffle=True)

    def val_dataloader(self) -> TensorBatches | LoaderBatches:
        return self._batches(self.val_split, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return to_float_images(batch, self.channels_last)
