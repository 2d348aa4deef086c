"""The augment stage: the prepared train split plus seeded augmented copies, and a preview grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnnpipe.atomic import atomic_dir, atomic_path
from cnnpipe.config import Config
from cnnpipe.console import info
from cnnpipe.data.augment import augmented_chunks
from cnnpipe.data.store import load_split, write_split

OUTPUT_NAMES = ("train.npz", "preview.png")  # all the stage writes into paths.augmented


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
    """Write `paths.augmented/train.npz` and `preview.png`; returns the number of training images.
    The prepared split is memory-mapped and the copies stream to the file chunk by chunk."""
    src = load_split(root / cfg.paths.prepared / "train.npz", mmap=True)
    n, copies = len(src.labels), cfg.augment.copies
    out = root / cfg.paths.augmented
    with atomic_dir(out, OUTPUT_NAMES) as tmp:
        chunks = augmented_chunks(src.images, cfg.augment, seed=cfg.seed)
        write_split(
            tmp / "train.npz", (n * (copies + 1), *src.images.shape[1:]), chunks, np.tile(src.labels, copies + 1)
        )
        if cfg.augment.preview and n:
            # Augmented samples (the copies) when there are any, else the originals: read back from the file.
            first = n if copies else 0
            written = load_split(tmp / "train.npz", mmap=True).images
            with atomic_path(tmp / "preview.png") as png:
                image_grid(np.array(written[first : first + cfg.augment.preview])).save(png, format="PNG")
    info("augment", f"{n} originals + {copies} augmented copies = {n * (copies + 1)} images")
    return n * (copies + 1)
