"""The DataLoader path, for splits that should not be copied whole onto the training device (or into
memory): samples are read from the memory-mapped `.npz` (data/store.py) by worker processes, one gather
per batch, and travel as uint8 (a quarter of float32's bytes), pinned when the device is a GPU. The
datamodule turns them into floats on the device. Batches and their order come from the same
`IndexBatches` as the in-memory path, so a run trains on exactly the same steps either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cnnpipe.data.augment import to_float
from cnnpipe.data.batches import IndexBatches
from cnnpipe.data.store import Split, map_npz_member


class SplitDataset(torch.utils.data.Dataset):
    """Map-style dataset over a split's images, fetched a batch at a time (`__getitems__`).

    A split loaded from a file is re-mapped lazily in each worker process, so starting a worker never
    copies (or pickles) the images; an in-memory split is used as it is."""

    def __init__(self, split: Split) -> None:
        self.source: Path | None = split.source if isinstance(split.images, np.memmap) else None
        self._images: np.ndarray | None = None if self.source is not None else split.images
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.source is not None:
            state["_images"] = None  # re-mapped in the worker
        return state

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            assert self.source is not None
            self._images = map_npz_member(self.source, "images")
        return self._images

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.images[index])), self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        ascending = np.argsort(idx, kind="stable")  # read the file front to back, then restore the order
        images = np.empty((len(idx), *self.images.shape[1:]), dtype=np.uint8)
        images[ascending] = self.images[idx[ascending]]
        return torch.from_numpy(images), self.labels[idx]


def _as_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # __getitems__ already returns the whole batch; a module-level function pickles


class LoaderBatches(DataLoader):
    """A DataLoader whose batch sampler is an `IndexBatches`: exposes `steps_per_epoch` like
    `TensorBatches`, so the module sizes its schedule the same way on both paths."""

    def __init__(self, dataset: SplitDataset, index: IndexBatches, workers: int, pin_memory: bool) -> None:
        super().__init__(
            dataset,
            batch_sampler=index,  # type: ignore[arg-type]
            collate_fn=_as_batch,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.index = index

    @property
    def steps_per_epoch(self) -> int:
        return self.index.steps_per_epoch


def to_float_images(batch: Any, channels_last: bool) -> Any:
    """uint8 batches from the DataLoader path become float images in [0, 1] on the device."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and batch[0].dtype == torch.uint8:
        images = to_float(batch[0])
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch[1]
    return batch
