"""Pictures: the confusion matrix, written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnpipe.figures import plt, save_png


def plain_label(text: str) -> str:
    """A class name shown as itself: matplotlib reads `$...$` as mathtext (and fails on bad TeX), so `$` is escaped."""
    return str(text).replace("$", r"\$")


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
