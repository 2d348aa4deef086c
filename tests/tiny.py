"""Tiny learnable data and a fast config for in-process fits (tests/test_fit.py, test_transfer.py) and the
DDP helper script (tests/ddp_steps.py)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cnnpipe.config import Config, load_config, to_config
from cnnpipe.data.store import Split

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(n: int = 60) -> tuple[dict, Split, Split]:
    """n 1x8x8 images of 3 classes, each class a bright band: learnable in a few epochs. Train = val."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    images = (rng.random((n, 1, 8, 8)) * 40).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, c * 2 : c * 2 + 2, :] = 220
    meta = {"image_shape": [1, 8, 8], "classes": ["a", "b", "c"], "mean": [0.2], "std": [0.3]}
    split = Split(images, labels.astype(np.int64))
    return meta, split, split


def photo_data(n: int = 36, seed: int = 0) -> tuple[dict[str, Any], Split, Split]:
    """n RGB images of 3 classes stored at 21x21 (input 20 / crop_pct 0.95, as prepare stores them for timm)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = (rng.random((n, 3, 21, 21)) * 60).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, c, :, :] += 150  # each class one bright colour channel
    meta = {
        "image_shape": [3, 21, 21],
        "classes": ["a", "b", "c"],
        "mean": [0.3] * 3,
        "std": [0.3] * 3,
        "preprocess": {"input_size": 20, "storage_size": 21, "interpolation": "bilinear", "crop_pct": 0.95},
    }
    split = Split(images, labels.astype(np.int64))
    return meta, split, split


def tiny_config(*overrides: str) -> Config:
    return load_config(
        ["train.hparams=params", "trainer.accelerator=cpu", "data.batch_size=16", "optim.lr=0.01", *overrides],
        root=ROOT,
    )


@functools.cache
def conf_defaults() -> Config:
    """The committed params.yaml as a Config: conf/ is the one source of defaults, the schema has none."""
    return load_config(["train.hparams=params"], root=ROOT)


def conf_section(section: str, /, **changes: Any) -> Any:
    """One section of the committed config (`data`, `model`, `optim`, `augment`, ...) with `changes` applied."""
    return dataclasses.replace(getattr(conf_defaults(), section), **changes)


def config_from(tree: dict[str, Any]) -> Config:
    """`tree` (a partial config, e.g. {"data": {...}}) over the committed params.yaml, checked like a stage's."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and k in base else v for k, v in over.items()}}

    return to_config(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), tree))
