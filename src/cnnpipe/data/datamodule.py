"""LightningDataModule over prepared splits held in memory (on the training device)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from cnnpipe.data.batches import TensorBatches
from cnnpipe.data.store import Split


def keep_on_device(policy: str, device: torch.device, nbytes: int) -> bool:
    """Whether the splits live on the training device: always, never, or (auto) on a GPU when they take
    under a quarter of its free memory — the rest is left for activations."""
    if device.type == "cpu" or policy == "always":
        return True
    if policy == "never":
        return False
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < free // 4
    return True


class InMemoryDataModule(pl.LightningDataModule):
    """Train and val splits as uint8 tensors; moved to the device once, batched by indexing."""

    def __init__(
        self,
        train: Split,
        val: Split,
        batch_size: int,
        seed: int,
        channels_last: bool = False,
        on_device: str = "auto",
        steps_per_call: int = 1,
    ) -> None:
        super().__init__()
        self.train_split, self.val_split = train, val
        self.batch_size, self.seed, self.channels_last, self.on_device = batch_size, seed, channels_last, on_device
        self.steps_per_call = steps_per_call

    def _batches(self, split: Split, shuffle: bool) -> TensorBatches:
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if not keep_on_device(self.on_device, device, self.train_split.images.nbytes + self.val_split.images.nbytes):
            device = torch.device("cpu")  # batches are indexed in host memory; Lightning moves each one over
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
        if self.channels_last:  # stored NHWC once, so every indexed batch already is
            images = images.contiguous(memory_format=torch.channels_last)
        # Drop a ragged last training batch only when it could be a single sample (BatchNorm needs 2).
        drop_last = shuffle and (len(labels) // max(world, 1)) % self.batch_size == 1
        # Several steps per Lightning iteration only on one process: under DDP every step's forward must
        # pass through the DDP wrapper, which Lightning calls once per iteration.
        per_call = self.steps_per_call if shuffle and world == 1 else 1
        batches = TensorBatches(
            images,
            labels,
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=drop_last,
            steps_per_call=per_call,
        )
        return batches.to(device).shard(rank, world)

    def train_dataloader(self) -> TensorBatches:
        batches = self._batches(self.train_split, shuffle=True)
        if self.trainer is not None:
            batches.set_epoch(self.trainer.current_epoch)
        return batches

    def val_dataloader(self) -> TensorBatches:
        return self._batches(self.val_split, shuffle=False)
