"""The prepare stage: source -> stratified splits + meta.json, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.atomic import atomic_dir, check_replaceable, write_json_atomic
from cnnpipe.config import Config
from cnnpipe.console import info, warn
from cnnpipe.data.sources import RawData, load_source
from cnnpipe.data.split import SPLITS, stratified_split
from cnnpipe.data.store import Split, rows_per_chunk, save_split

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


def prepare_splits(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Load the configured source, split it, write `out_dir/{train,val,test}.npz` and meta.json."""
    names = [*(f"{name}.npz" for name in SPLITS), META_FILE]
    check_replaceable(out_dir, names)  # before decoding the source: a folder of someone else's is refused at once
    raw = load_source(cfg.data)
    if raw.skipped:
        warn("prepare", f"skipped {len(raw.skipped)} unreadable image(s); listed in {out_dir / META_FILE}")
    splits = stratified_split(raw.labels, cfg.data.split, cfg.seed, raw.classes)
    meta = build_meta(cfg, raw, splits)
    with atomic_dir(out_dir, names) as tmp:
        for name in SPLITS:
            save_split(tmp / f"{name}.npz", Split(raw.images, raw.labels), index=splits[name])
        write_json_atomic(tmp / META_FILE, meta)
    sizes = ", ".join(f"{s} {meta['counts'][s]['total']}" for s in SPLITS)
    info("prepare", f"{cfg.data.name}: {len(raw.classes)} classes, shape {meta['image_shape']}: {sizes}")
    return meta
