"""matplotlib for files only (the Agg backend: no display needed), and the one way a figure becomes a PNG:
written atomically, then closed. The training curves, the confusion matrix and the sweep's pictures use it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cnnpipe.atomic import atomic_path

__all__ = ["plt", "save_png"]


def save_png(fig: plt.Figure, path: Path, dpi: int = 110) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
