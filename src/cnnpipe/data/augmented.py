"""The augmented split's preview grid (preview.png): per class, originals beside augmented copies of them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PREVIEW_CLASSES = 32  # rows of the preview at most: the classes after the first 32 are left out (and said so)
PREVIEW_COLUMNS = 16  # images per row at most
MIN_CELL, MAX_CELL = 32, 64  # a cell's side in pixels: small images are enlarged (nearest), large ones shrunk
GAP = 2  # pixels between cells, and (doubled) between an original-and-augmented pair and the next
LABEL_CHARS = 14  # class names are cut to this many characters


def preview_rows(labels: np.ndarray, per_class: int, max_classes: int = PREVIEW_CLASSES) -> dict[int, list[int]]:
    """Which originals the preview shows: for each class present (ascending, the first `max_classes`), the
    indices of its first `per_class` images, whatever order the split is in (prepare writes it class by class)."""
    rows: dict[int, list[int]] = {}
    for label in np.unique(labels)[:max_classes]:
        rows[int(label)] = np.flatnonzero(labels == label)[:per_class].tolist()
    return rows


def _cell(image: np.ndarray, side: int) -> Image.Image:
    """uint8 (C, H, W) -> a picture fitted into `side` x `side` (aspect kept; enlarged nearest, shrunk smooth)."""
    c, h, w = image.shape
    picture = Image.fromarray(image[0] if c == 1 else image.transpose(1, 2, 0))
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    return picture.resize(size, resample)


def preview_picture(
    images: np.ndarray, labels: np.ndarray, n_originals: int, copies: int, budget: int, classes: list[str] | None = None
) -> Image.Image:
    """The preview grid: one row per class (the first PREVIEW_CLASSES), its name on the left, then its first
    originals each followed by one augmented copy of it (copy 1, 2, ... in turn), about `budget` images in all
    (at least one original, or pair, per class; at most PREVIEW_COLUMNS per row).

    `images` (uint8 (N, C, H, W)) is the written split: `n_originals` originals, then `copies` copies of them in
    the same order, so copy k of original i is image k * n_originals + i."""
    c, h, w = images.shape[1:]
    present = np.unique(labels[:n_originals])
    n_rows = min(len(present), PREVIEW_CLASSES)
    per_row = min(PREVIEW_COLUMNS, max(2 if copies else 1, budget // max(1, n_rows)))
    per_class = per_row // 2 if copies else per_row
    rows = preview_rows(labels[:n_originals], per_class)
    side = min(MAX_CELL, max(MIN_CELL, h, w))
    font = ImageFont.load_default()
    mode = "L" if c == 1 else "RGB"
    measure = ImageDraw.Draw(Image.new(mode, (1, 1)))
    names = {
        # one line each: a class (folder) name may hold a newline or a tab
        label: " ".join((classes[label] if classes is not None and label < len(classes) else str(label)).split())[
            :LABEL_CHARS
        ]
        for label in rows
    }
    label_width = int(max(measure.textlength(f"{name} ", font=font) for name in names.values())) + GAP
    header = 14
    step = side + GAP
    title = "pairs: original, augmented" if copies else "originals"
    if len(present) > n_rows:
        title += f" (first {n_rows} of {len(present)} classes)"
    width = max(label_width + per_row * step + (per_row // 2) * GAP, int(measure.textlength(title, font=font)) + 4)
    picture = Image.new(mode, (width, header + n_rows * step), 0 if c == 1 else (0, 0, 0))
    draw = ImageDraw.Draw(picture)
    white = 255 if c == 1 else (255, 255, 255)
    draw.text((2, 1), title, fill=white, font=font)
    for r, (label, picks) in enumerate(rows.items()):
        top = header + r * step
        draw.text((2, top + (side - 10) // 2), names[label], fill=white, font=font)
        cells: list[int] = []
        for j, index in enumerate(picks):
            cells += [index, (j % copies + 1) * n_originals + index] if copies else [index]
        x = label_width
        for k, index in enumerate(cells):
            cell = _cell(np.asarray(images[index]), side)
            picture.paste(cell, (x + (side - cell.width) // 2, top + (side - cell.height) // 2))
            x += step + (GAP if copies and k % 2 else 0)
    return picture
