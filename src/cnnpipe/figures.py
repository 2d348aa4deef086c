"""matplotlib for files only (the Agg backend: no display needed), and the one way a figure becomes a PNG:
written atomically, then closed. The training curves, the evaluation pictures and the sweep's pictures use it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb

from cnnpipe.atomic import atomic_path

__all__ = ["plt", "save_png"]


def save_png(
    fig: plt.Figure, path: Path, dpi: int = 110, compact_above: int | None = None, keep: Sequence[str] = ()
) -> None:
    """The figure as a PNG at `path`. A picture larger than `compact_above` bytes (photographs: 16 thumbnails are
    ~800 KB as RGB) is re-encoded with an adaptive 256-colour palette, dithered: ~3x smaller and alike at this
    size. White, black and the `keep` colours (text, frames) stay exact; PIL's palette lookup is approximate."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    if compact_above is None or path.stat().st_size <= compact_above:
        return
    with Image.open(path) as picture:
        rgb = picture.convert("RGB")
    exact = [(255, 255, 255), (0, 0, 0), *(tuple(round(255 * v) for v in to_rgb(c)) for c in keep)]
    found = rgb.reduce(4).quantize(256 - len(exact), method=Image.Quantize.MEDIANCUT)  # a quarter: as good, faster
    colours = [v for c in exact for v in c] + (found.getpalette() or [])
    palette = Image.new("P", (1, 1))
    palette.putpalette(colours[: 256 * 3])
    indexed = np.array(rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG))
    pixels = np.asarray(rgb)
    for i, colour in enumerate(exact):
        indexed[(pixels == colour).all(axis=-1)] = i
    compact = Image.fromarray(indexed)  # mode L; the palette makes it P
    compact.putpalette(colours[: 256 * 3])
    with atomic_path(path) as tmp:
        compact.save(tmp, format="PNG")
