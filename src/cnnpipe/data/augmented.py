"""The augment stage: the prepared train split plus seeded augmented copies, and a preview grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnnpipe.atomic import atomic_dir, atomic_path
from cnnpipe.config import Config
from cnnpipe.console import info
from cnnpipe.data.augment import augment_copies
from cnnpipe.data.store import Split, load_split, save_split


def image_grid(images: np.ndarray, columns: int = 16, min_cell: int = 32) -> Image.Image:
    """uint8 (N, C, H, W) -> one picture, each image upscaled (nearest) to at least `min_cell` pixels."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    cols = min(columns, n)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i].transpose(1, 2, 0)
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    zoom = max(1, -(-min_cell // max(h, w)))
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)


def write_augmented(cfg: Config, root: Path) -> int:
    """Write `paths.augmented/train.npz` and `preview.png`; returns the number of training images."""
    src = load_split(root / cfg.paths.prepared / "train.npz")
    images, labels = augment_copies(src.images, src.labels, cfg.augment, seed=cfg.seed)
    out = root / cfg.paths.augmented
    with atomic_dir(out) as tmp:
        save_split(tmp / "train.npz", Split(images, labels))
        if cfg.augment.preview:
            # Augmented samples (the copies) when there are any, else the originals.
            pool = images[len(src.labels) :] if cfg.augment.copies else images
            with atomic_path(tmp / "preview.png") as png:
                image_grid(pool[: cfg.augment.preview]).save(png, format="PNG")
    info(
        "augment",
        f"{len(src.labels)} originals + {cfg.augment.copies} augmented copies = {len(labels)} images",
    )
    return len(labels)
