"""What the prepare stage computes besides the splits: meta.json (classes, shapes, counts, channel statistics).
The stage itself (load, split, write atomically) is `cnnpipe.stages.prepare`."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnpipe.config import Config
from cnnpipe.data.sources import RawData
from cnnpipe.data.store import rows_per_chunk

META_FILE = "meta.json"
STATS_CHUNK_VALUES = 1 << 21  # pixel values per chunk for the channel statistics (16 MB as int64)


def channel_stats(images: np.ndarray, index: np.ndarray | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (those `index` picks), on the [0, 1] scale the models
    normalise with. Exact integer sums over chunks: a float64 copy of the whole split would take 8x its bytes."""
    rows = np.arange(len(images)) if index is None else np.asarray(index)
    channels = images.shape[1]
    per_chunk = rows_per_chunk(images, STATS_CHUNK_VALUES)
    total, squares = np.zeros(channels, dtype=np.int64), np.zeros(channels, dtype=np.int64)
    for start in range(0, len(rows), per_chunk):
        chunk = np.asarray(images[rows[start : start + per_chunk]], dtype=np.int64)
        total += chunk.sum(axis=(0, 2, 3))
        squares += np.square(chunk, out=chunk).sum(axis=(0, 2, 3))
    count = len(rows) * images.shape[2] * images.shape[3]
    mean = total / count
    var = np.maximum(squares / count - mean * mean, 0.0)
    return [round(float(m) / 255.0, 6) for m in mean], [round(max(float(s) / 255.0, 1e-3), 6) for s in np.sqrt(var)]


def build_meta(cfg: Config, raw: RawData, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    mean, std = channel_stats(raw.images, splits["train"])
    counts = {
        s: {"total": len(idx), "per_class": np.bincount(raw.labels[idx], minlength=len(raw.classes)).tolist()}
        for s, idx in splits.items()
    }
    return {
        "dataset": cfg.data.name,
        "source": str(cfg.data.path) if cfg.data.path else cfg.data.name,
        "classes": raw.classes,
        "num_classes": len(raw.classes),
        "image_shape": list(raw.images.shape[1:]),
        "mean": mean,
        "std": std,
        "counts": counts,
        "source_digest": raw.digest,
        "skipped": raw.skipped,
        "ignored_files": raw.ignored,
        "seed": cfg.seed,
    }
