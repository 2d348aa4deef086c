"""In-memory batches: the whole split lives in one tensor (on the training device when it fits),
and a batch is one index into it — no Dataset, no per-sample Python, no host copy per step.

A training iterable may hand over several consecutive batches at once (`steps_per_call`): one gather,
which the LightningModule splits into per-step views (see `ImageClassifier`).

Under DDP each rank takes a disjoint, strided shard of the same seeded permutation, so every sample is
seen once per epoch across ranks; evaluation shards are not padded (no double counting).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class TensorBatches:
    """Iterable of (float images in [0, 1], int64 labels) batches over uint8 tensors; each item holds up
    to `steps_per_call` batches of `batch_size` back to back (the last of an epoch may be shorter)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        steps_per_call: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.steps_per_call = max(1, steps_per_call)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def to(self, device: torch.device | str) -> TensorBatches:
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def shard(self, rank: int, world_size: int) -> TensorBatches:
        self.rank, self.world_size = rank, world_size
        return self

    def set_epoch(self, epoch: int) -> None:
        """Start the per-epoch permutations at `epoch` (after a resume, the trainer's current epoch)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.shuffle:  # equal shard sizes keep DDP ranks in step: drop the remainder
                order = order[: n - n % self.world_size]
            order = order[self.rank :: self.world_size]
        return order.to(self.labels.device)

    @property
    def steps_per_epoch(self) -> int:
        """Batches of `batch_size` per epoch on this rank (optimiser steps, whatever `steps_per_call`)."""
        n = len(self.labels)
        if self.world_size > 1:
            if self.shuffle:
                n -= n % self.world_size
            n = len(range(self.rank, n, self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return -(-self.steps_per_epoch // self.steps_per_call)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        chunk = self.batch_size * self.steps_per_call
        for start in range(0, stop, chunk):
            idx = order[start : min(start + chunk, stop)]
            yield self.images[idx].float().div_(255.0), self.labels[idx]
        self.epoch += 1
