"""Pictures: the confusion matrix, written atomically as PNG, and how a class name is shown in any picture."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cnnpipe.figures import plt, save_png

WRONG = "#c0392b"  # red: a wrong prediction, in every picture
RIGHT = "#1e6b30"  # dark green: a right one
COMPACT_ABOVE = 300_000  # bytes: a larger picture (photographs) is saved with a 256-colour palette (save_png)


def plain_label(text: str) -> str:
    """A class name shown as itself: matplotlib reads `$...$` as mathtext (and fails on bad TeX), so `$` is escaped."""
    return str(text).replace("$", r"\$")


_WHITESPACE = re.compile(r"\s+")


def short_label(text: str, width: int = 18) -> str:
    """A class name for a picture's title: on one line, at most `width` characters (the end elided as `…`), shown
    as itself (`plain_label`). Long image-folder names would otherwise run into the neighbouring picture."""
    text = _WHITESPACE.sub(" ", str(text)).strip()
    if len(text) > width:
        text = text[: width - 1].rstrip() + "…"
    return plain_label(text)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str = "test confusion matrix") -> None:
    n = len(classes)
    size = max(4.0, min(16.0, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    labels = [plain_label(c) for c in classes]
    ax.set_xticks(range(n), labels, rotation=90 if n > 12 else 0)
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    if n <= 30:
        peak = matrix.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(int(matrix[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if matrix[i, j] > peak / 2 else "black",
                )
    save_png(fig, path)
