"""Which samples each training step sees, and in-memory batches built from that.

`IndexBatches` is the one place that orders samples: a seeded permutation per epoch (or, with
`train.class_balance=sampler`, a seeded class-balanced draw with replacement: `BalancedDraw`; or the plain
order for evaluation), sharded per DDP rank, cut into batches. `TensorBatches` indexes whole splits that live in
one tensor (on the training device when they fit): a batch is one gather, no Dataset, no per-sample Python,
no host copy per step. The DataLoader path (data/streaming.py) uses the same `IndexBatches` as its batch
sampler, so both paths train on the same batches in the same order.

A training iterable may hand over several consecutive batches at once (`steps_per_call`): one gather,
which the LightningModule splits into per-step views (see `ImageClassifier`).

Under DDP each rank takes a disjoint, strided shard of the same seeded permutation (or draw), so every sample is
seen once per epoch across ranks; evaluation shards are not padded (no double counting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from cnnpipe.data.augment import to_float


class BalancedDraw:
    """`n` sample indices drawn with replacement so that every class is equally likely: sample i has probability
    1 / (classes * count of its class), the distribution of `torch.multinomial` over per-sample weights 1/count.

    Drawn in two steps, a class uniformly and then a sample of it uniformly, because `torch.multinomial` refuses
    more than 2**24 categories (samples) and took 0.49 s per epoch of 1M samples where this takes 0.06 s (one
    thread). A class without samples is never drawn."""

    def __init__(self, labels: torch.Tensor) -> None:
        labels = labels.long()
        self.counts = torch.bincount(labels)
        self.classes = self.counts.nonzero().flatten()
        self.by_class = torch.argsort(labels, stable=True)  # sample indices, grouped by class
        self.starts = self.counts.cumsum(0) - self.counts  # where each class's group begins in `by_class`

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        picked = self.classes[torch.randint(len(self.classes), (n,), generator=generator)]
        within = (torch.rand(n, generator=generator, dtype=torch.float64) * self.counts[picked]).long()
        return self.by_class[self.starts[picked] + within]


class IndexBatches:
    """Per epoch: index tensors of up to `batch_size * steps_per_call` samples (the last may be shorter).

    `balance_labels` (training only): each epoch's `n` samples are a seeded class-balanced draw with
    replacement from these labels (`BalancedDraw`) instead of a permutation; the epoch keeps its length."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        steps_per_call: int = 1,
        epoch_of: Callable[[], int] | None = None,
        balance_labels: torch.Tensor | None = None,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.steps_per_call = max(1, steps_per_call)
        # Under a Trainer the epoch comes from it (`epoch_of`): Lightning stops at the last batch without
        # exhausting the iterator and may call iter() more than once per epoch, so counting passes is wrong.
        self.epoch_of = epoch_of
        self.epoch = 0
        if balance_labels is not None and (not shuffle or len(balance_labels) != n):
            raise ValueError(f"balance_labels: {len(balance_labels)} labels for {n} shuffled samples expected")
        self.balanced = BalancedDraw(balance_labels) if balance_labels is not None else None

    def set_epoch(self, epoch: int) -> None:
        """The next pass is epoch `epoch` (without `epoch_of`)."""
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """This rank's samples for the current epoch, in the order they are seen."""
        n = self.n
        if self.shuffle:
            epoch = self.epoch_of() if self.epoch_of is not None else self.epoch
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=gen) if self.balanced is None else self.balanced(n, gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.shuffle:  # equal shard sizes keep DDP ranks in step: drop the remainder
                order = order[: n - n % self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    @property
    def steps_per_epoch(self) -> int:
        """Batches of `batch_size` per epoch on this rank (optimiser steps, whatever `steps_per_call`)."""
        n = self.n
        if self.world_size > 1:
            if self.shuffle:
                n -= n % self.world_size
            n = len(range(self.rank, n, self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return -(-self.steps_per_epoch // self.steps_per_call)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.order()
        self.epoch += 1  # without `epoch_of`: each pass is the next epoch
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        chunk = self.batch_size * self.steps_per_call
        for start in range(0, stop, chunk):
            yield order[start : min(start + chunk, stop)]


class TensorBatches:
    """Iterable of (float images in [0, 1], int64 labels) batches over uint8 tensors; each item holds up
    to `steps_per_call` batches of `batch_size` back to back (the last of an epoch may be shorter)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, index: IndexBatches) -> None:
        self.images, self.labels, self.index = images, labels, index

    def to(self, device: torch.device | str) -> TensorBatches:
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    @property
    def steps_per_epoch(self) -> int:
        return self.index.steps_per_epoch

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.labels.device
        for idx in self.index:
            idx = idx.to(device)
            yield to_float(self.images[idx]), self.labels[idx]
