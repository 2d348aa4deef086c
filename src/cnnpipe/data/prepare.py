"""The prepare stage: source -> stratified splits + meta.json, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.atomic import atomic_dir, write_json_atomic
from cnnpipe.config import Config
from cnnpipe.console import info, warn
from cnnpipe.data.sources import RawData, load_source
from cnnpipe.data.split import SPLITS, stratified_split
from cnnpipe.data.store import Split, save_split


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale the models normalise with."""
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return [round(float(m), 6) for m in mean], [round(float(max(s, 1e-3)), 6) for s in std]


def build_meta(cfg: Config, raw: RawData, splits: dict[str, np.ndarray]) -> dict[str, Any]:
    mean, std = channel_stats(raw.images[splits["train"]])
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
    raw = load_source(cfg.data)
    if raw.skipped:
        warn("prepare", f"skipped {len(raw.skipped)} unreadable image(s); listed in {out_dir / 'meta.json'}")
    splits = stratified_split(raw.labels, cfg.data.split, cfg.seed, raw.classes)
    meta = build_meta(cfg, raw, splits)
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            save_split(tmp / f"{name}.npz", Split(raw.images[splits[name]], raw.labels[splits[name]]))
        write_json_atomic(tmp / "meta.json", meta)
    sizes = ", ".join(f"{s} {meta['counts'][s]['total']}" for s in SPLITS)
    info("prepare", f"{cfg.data.name}: {len(raw.classes)} classes, shape {meta['image_shape']}: {sizes}")
    return meta
