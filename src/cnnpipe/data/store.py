"""Prepared data on disk: one `.npz` per split (uint8 images, int64 labels; no pickle) plus meta.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.errors import DataError


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)


def save_split(path: Path, split: Split) -> None:
    with open(path, "wb") as fh:
        np.savez(
            fh,
            images=np.ascontiguousarray(split.images, dtype=np.uint8),
            labels=split.labels.astype(np.int64),
        )


def load_split(path: Path) -> Split:
    if not path.is_file():
        raise DataError(f"{path}: missing (run the stage that writes it first, or `dvc repro`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return Split(npz["images"], npz["labels"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a cnnpipe split file ({exc})") from None


def load_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run `dvc repro prepare` first)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
