"""The augment stage: the prepared train split plus seeded augmented copies, and a preview grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnpipe.atomic import atomic_dir, atomic_path
from cnnpipe.config import Config
from cnnpipe.console import info
from cnnpipe.data import augmented
from cnnpipe.data.augment import augmented_chunks
from cnnpipe.data.store import load_meta, load_split, write_split

OUTPUT_NAMES = ("train.npz", "preview.png")  # all the stage writes into paths.augmented


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
            # Every class, one row each: originals beside augmented copies of them, read back from the file.
            written = load_split(tmp / "train.npz", mmap=True)
            meta_folder = root / cfg.paths.prepared
            classes = load_meta(meta_folder)["classes"] if (meta_folder / "meta.json").is_file() else None
            picture = augmented.preview_picture(written.images, written.labels, n, copies, cfg.augment.preview, classes)
            with atomic_path(tmp / "preview.png") as png:
                picture.save(png, format="PNG")
            shown = len(np.unique(src.labels))
            if shown > augmented.PREVIEW_CLASSES:
                info("augment", f"preview.png shows the first {augmented.PREVIEW_CLASSES} of {shown} classes")
    info("augment", f"{n} originals + {copies} augmented copies = {n * (copies + 1)} images")
    return n * (copies + 1)
