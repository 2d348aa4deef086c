"""The augment stage's preview.png: every class in it, one row each (issue #15, item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from cnnpipe.config import load_config
from cnnpipe.data import augmented
from cnnpipe.data.store import Split, save_split
from cnnpipe.stages import augment
from tests.helpers import ROOT


def class_ordered(counts: list[int], size: int = 8) -> Split:
    """A split written class by class (as prepare writes it): class k's pixels all lie in [40 + 60k, 44 + 60k]
    (apart from the black background and the white text of the preview)."""
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    rng = np.random.default_rng(0)
    images = (40 + labels[:, None, None, None] * 60 + rng.integers(0, 5, (len(labels), 1, size, size))).astype(np.uint8)
    return Split(images, labels)


def test_preview_rows_cover_every_class_of_a_class_ordered_split() -> None:
    """Class 0's 100 images come first: the first 64 images (what the preview showed) are all class 0."""
    split = class_ordered([100, 30, 5])
    rows = augmented.preview_rows(split.labels, per_class=4)
    assert sorted(rows) == [0, 1, 2]
    for label, picks in rows.items():
        assert picks and all(split.labels[i] == label for i in picks)
    assert rows[2] == [130, 131, 132, 133]


def test_preview_rows_are_bounded() -> None:
    labels = np.arange(50).repeat(3)
    rows = augmented.preview_rows(labels, per_class=2, max_classes=32)
    assert list(rows) == list(range(32)) and all(len(p) == 2 for p in rows.values())


def test_preview_png_shows_every_class_beside_its_copies(tmp_path: Path) -> None:
    """write_augmented on a class-ordered split: one row per class, each row's originals are that class's."""
    cfg = load_config(["augment.copies=2", "augment.preview=64"], root=ROOT)
    split = class_ordered([100, 30, 5])
    prepared = tmp_path / cfg.paths.prepared
    prepared.mkdir(parents=True)
    save_split(prepared / "train.npz", split)
    augment.write_augmented(cfg, tmp_path)
    preview = np.asarray(Image.open(tmp_path / cfg.paths.augmented / "preview.png"))
    rows = []
    for label in range(3):
        # Pixel rows holding at least one whole original of class `label` (a cell is MIN_CELL pixels wide).
        band = (preview >= 40 + 60 * label) & (preview <= 44 + 60 * label)
        rows.append(set(np.flatnonzero(band.sum(axis=1) >= augmented.MIN_CELL).tolist()))
    assert all(rows), [len(r) for r in rows]  # every class shows
    assert max(rows[0]) < min(rows[1]) and max(rows[1]) < min(rows[2])  # one row each, in class order


def test_preview_uses_the_class_names_and_bounds_its_size(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (2 * 80, 3, 200, 200), dtype=np.uint8)
    labels = np.tile(np.arange(40).repeat(2), 2)
    picture = augmented.preview_picture(images, labels, 80, 1, 64, [f"class {i}" for i in range(40)])
    step = augmented.MAX_CELL + augmented.GAP
    assert picture.mode == "RGB"
    assert picture.height <= 20 + augmented.PREVIEW_CLASSES * step
    assert picture.width <= 200 + augmented.PREVIEW_COLUMNS * step * 2


def test_preview_reads_class_names_from_meta(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(["augment.copies=0"], root=ROOT)
    split = class_ordered([10, 10])
    prepared = tmp_path / cfg.paths.prepared
    prepared.mkdir(parents=True)
    save_split(prepared / "train.npz", split)
    meta = {"classes": ["cat", "dog"], "num_classes": 2, "image_shape": [1, 8, 8], "mean": [0.1], "std": [0.2]}
    (prepared / "meta.json").write_text(json.dumps(meta))
    seen = {}
    original = augmented.preview_picture

    def spy(*args, **kwargs):
        seen["classes"] = args[5] if len(args) > 5 else kwargs.get("classes")
        return original(*args, **kwargs)

    monkeypatch.setattr(augmented, "preview_picture", spy)
    augment.write_augmented(cfg, tmp_path)
    assert seen["classes"] == ["cat", "dog"]
    assert (tmp_path / cfg.paths.augmented / "preview.png").is_file()
