"""The training reference: what the model's inputs and answers looked like on held-out data at training time.

Written by the train stage beside the weights (`models/reference.npz`) and shipped inside the logged MLflow model,
so a served copy of the model knows its own principal axes (to summarise each embedding in K numbers) and the
monitor finds the reference wherever the model is. Built from the validation split (at most MAX_IMAGES of it,
a seeded draw): images the network did not train on, so its confidences there are those it will show on new
images of the same kind, not the higher ones of the training images.

One `.npz` of plain arrays plus a JSON header (`info`), read with `allow_pickle=False`: loading a reference runs
no code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.atomic import atomic_path
from cnnpipe.errors import DataError

REFERENCE = "reference.npz"
FORMAT = 1
MAX_IMAGES = 2000  # enough for the two-sample tests' power at windows of a few hundred; ~0.1 MB at K=8
AXES = 8  # principal axes kept: the embedding summary a prediction log stores per image
SAMPLE_KEYS = ("brightness", "contrast", "width", "height", "confidence", "predicted", "embedding")


@dataclass
class Reference:
    """`sample`: per-image arrays keyed as `SAMPLE_KEYS` (width/height only where the sources' sizes are known per
    image; embedding only when the classifier layer was found). `info`: model_run, weights_sha256, layer, classes,
    size_min / size_max ([width, height] of the training sources), images, source."""

    sample: dict[str, np.ndarray]
    info: dict[str, Any]
    axes_mean: np.ndarray | None = None  # (D,)
    axes: np.ndarray | None = None  # (K, D)

    @property
    def layer(self) -> str | None:
        return self.info.get("layer")

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.info["classes"]]


def draw(n: int, limit: int = MAX_IMAGES, seed: int = 0) -> np.ndarray:
    """Which of `n` images the reference uses: all up to `limit`, else a seeded draw of `limit`, in order."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def source_sizes(meta: dict[str, Any]) -> tuple[list[int], list[int], bool]:
    """(size_min, size_max, per_image) of the training sources, [width, height]: from meta.json's checks for image
    folders; the stored size for bundled arrays, which arrive at that size (then `per_image`: every image has it)."""
    source = (meta.get("checks") or {}).get("source")
    if source:
        lo = [int(source["width"]["min"]), int(source["height"]["min"])]
        hi = [int(source["width"]["max"]), int(source["height"]["max"])]
        return lo, hi, source.get("kind") != "files" and lo == hi  # files: resized by prepare, sizes unknown
    height, width = (int(d) for d in meta["image_shape"][-2:])
    return [width, height], [width, height], True


def build_reference(
    images: np.ndarray,
    probs: np.ndarray,
    embeddings: np.ndarray | None,
    meta: dict[str, Any],
    info: dict[str, Any],
) -> Reference:
    """The reference of uint8 (N, C, H, W) held-out `images`, given the model's softmax `probs` on them and its
    penultimate `embeddings` (None: no classifier layer found). `info`: model_run, weights_sha256, layer, classes."""
    from cnnpipe.monitoring.features import input_stats, principal_axes, project

    brightness, contrast = input_stats(images)
    size_min, size_max, per_image = source_sizes(meta)
    sample = {
        "brightness": brightness,
        "contrast": contrast,
        "confidence": probs.max(axis=1).astype(np.float64),
        "predicted": probs.argmax(axis=1).astype(np.int64),
    }
    if per_image:
        sample["width"] = np.full(len(images), size_min[0], dtype=np.int64)
        sample["height"] = np.full(len(images), size_min[1], dtype=np.int64)
    mean = axes = None
    if embeddings is not None:
        mean, axes = principal_axes(embeddings, AXES)
        sample["embedding"] = project(embeddings, mean, axes)
    head = {**info, "size_min": size_min, "size_max": size_max, "images": len(images)}
    return Reference(sample, head, mean, axes)


def save_reference(path: Path, ref: Reference) -> None:
    arrays: dict[str, np.ndarray] = {f"sample_{k}": v for k, v in ref.sample.items()}
    if ref.axes is not None and ref.axes_mean is not None:
        arrays["axes"], arrays["axes_mean"] = ref.axes, ref.axes_mean
    info = {"format": FORMAT, **ref.info}
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.savez_compressed(fh, info=np.array(json.dumps(info)), **arrays)  # type: ignore[arg-type]


def load_reference(path: Path) -> Reference:
    """The reference at `path`; a missing, damaged or newer-format file is one line naming it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            info = json.loads(str(npz["info"]))
            sample = {k.removeprefix("sample_"): npz[k] for k in npz.files if k.startswith("sample_")}
            axes = npz["axes"] if "axes" in npz.files else None
            mean = npz["axes_mean"] if "axes_mean" in npz.files else None
    except FileNotFoundError:
        raise DataError(f"{path}: no training reference (models trained before cnnpipe kept one: retrain)") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a cnnpipe training reference ({type(exc).__name__}: {exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{path}: reference format {info.get('format')!r}, this cnnpipe reads format {FORMAT}")
    return Reference(sample, info, mean, axes)
