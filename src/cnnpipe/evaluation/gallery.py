"""What the model gets wrong, as pictures of the test images themselves: the error gallery (the highest-loss
images, eval/errors.png, listed in eval/errors.csv so it can be checked and diffed) and the most-confused class
pairs with examples of each mistake (eval/confused.png). Both always exist: with nothing to show they say so.

Images arrive as uint8 (N, C, H, W), as the network saw them (the caller takes the central crop of photos).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnpipe.evaluation.plots import COMPACT_ABOVE, RIGHT, WRONG, short_label
from cnnpipe.figures import plt, save_png

GALLERY_SIZE = 16  # a 4 x 4 grid
GALLERY_COLUMNS = 4
PAIRS = 5  # most-confused pairs shown, one row each
PAIR_EXAMPLES = 6  # examples per pair
CELL = 1.9  # inches per thumbnail; at 110 dpi ~210 px: 8x8 digits upscaled, 224-px photos drawn near their size
NAME_CHARS = 15  # class names in a thumbnail's title: "pred: <name> (p=0.97)" fits the thumbnail's width
NEAREST_UP_TO = 64  # images this small are upscaled with visible pixels (nearest); larger ones antialiased


@dataclass(frozen=True)
class Ranked:
    """One test image by its loss: `rank` 1 is the highest."""

    rank: int
    index: int  # position in the test split
    actual: int
    predicted: int
    p_predicted: float  # the probability the model gave its prediction
    p_actual: float  # ... and the true class
    loss: float  # cross-entropy, -log p_actual

    @property
    def wrong(self) -> bool:
        return self.actual != self.predicted


def rank_by_loss(
    logits: torch.Tensor, labels: torch.Tensor, where: torch.Tensor | None = None, limit: int | None = None
) -> list[Ranked]:
    """Test images by per-sample cross-entropy, highest first (ties: lower index first); only those `where`
    is true, when given; the first `limit` (a record per image of a 50,000-image test split costs seconds).
    The highest losses are the confident mistakes: the true class got almost nothing."""
    loss = F.cross_entropy(logits.float(), labels, reduction="none")
    probs = logits.float().softmax(dim=1)
    predicted = probs.argmax(dim=1)
    candidates = torch.arange(len(labels)) if where is None else torch.nonzero(where).flatten()
    order = candidates[torch.argsort(loss[candidates], descending=True, stable=True)][:limit]
    return [
        Ranked(
            rank=rank,
            index=i,
            actual=int(labels[i]),
            predicted=int(predicted[i]),
            p_predicted=float(probs[i, predicted[i]]),
            p_actual=float(probs[i, labels[i]]),
            loss=float(loss[i]),
        )
        for rank, i in enumerate(order.tolist(), start=1)
    ]


def errors_csv(ranked: list[Ranked], classes: list[str]) -> str:
    """errors.csv: the gallery's images in its order, by test index, with the numbers behind their titles."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["rank", "index", "true", "predicted", "p_predicted", "p_true", "loss"])
    for r in ranked:
        writer.writerow(
            [
                r.rank,
                r.index,
                classes[r.actual],
                classes[r.predicted],
                round(r.p_predicted, 6),
                round(r.p_actual, 6),
                round(r.loss, 6),
            ]
        )
    return buf.getvalue()


def most_confused(confusion: torch.Tensor | np.ndarray, top: int = PAIRS) -> list[tuple[int, int, int]]:
    """(actual, predicted, count) of the `top` largest off-diagonal confusion cells (rows actual), largest first;
    ties in row-major order. Cells with no image are left out."""
    m = np.asarray(confusion).copy()
    np.fill_diagonal(m, 0)
    flat = np.argsort(-m, axis=None, kind="stable")[:top]
    cells = [(*divmod(int(i), m.shape[1]), int(m.flat[i])) for i in flat]
    return [(a, p, n) for a, p, n in cells if n > 0]


def _display(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(H, W) grey or (H, W, 3) colour pixels from one (C, H, W) image, and the colour map imshow needs."""
    if image.shape[0] == 3:
        return np.moveaxis(image, 0, -1), None
    return image[0], "gray"  # grey (or another channel count: its first channel)


def _thumbnail(ax: plt.Axes, image: np.ndarray, title: str, color: str, fontsize: float = 8.5) -> None:
    pixels, cmap = _display(image)
    small = max(pixels.shape[:2]) <= NEAREST_UP_TO
    ax.imshow(pixels, cmap=cmap, vmin=0, vmax=255, interpolation="nearest" if small else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set(color=color, linewidth=2.5 if color == WRONG else 0.8)
    ax.set_title(title, fontsize=fontsize, color=color, linespacing=1.15)


def _save(fig: plt.Figure, path: Path) -> None:
    save_png(fig, path, compact_above=COMPACT_ABOVE, keep=(WRONG, RIGHT))


def _empty(path: Path, title: str, message: str) -> None:
    """The honest empty state: a small framed panel, titled as the picture would be, that says why there is
    nothing to show."""
    fig, ax = plt.subplots(figsize=(5.5, 1.6))
    ax.set(xticks=[], yticks=[], facecolor="#f4f4f4")
    for spine in ax.spines.values():
        spine.set_color("0.75")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, transform=ax.transAxes)
    ax.set_title(title, fontsize=11)
    save_png(fig, path)


def error_gallery_figure(images: np.ndarray, ranked: list[Ranked], classes: list[str]) -> plt.Figure:
    """The ranked images (at least one) in a grid, each titled with its true and predicted class and the
    probability of the prediction; wrong ones in red and framed."""
    cols = min(GALLERY_COLUMNS, len(ranked))
    rows = -(-len(ranked) // cols)
    width, height = (CELL + 0.2) * cols, (CELL + 0.5) * rows + 0.45  # inches
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.05 / height, top=1 - 0.8 / height, wspace=0.2 / CELL, hspace=0.5 / CELL
    )
    for ax in axes.flat[len(ranked) :]:
        ax.axis("off")
    for ax, r in zip(axes.flat, ranked, strict=False):
        true, pred = short_label(classes[r.actual], NAME_CHARS), short_label(classes[r.predicted], NAME_CHARS)
        title = f"true: {true}\npred: {pred} (p={r.p_predicted:.2f})"
        _thumbnail(ax, images[r.index], title, WRONG if r.wrong else RIGHT)
    wrong = sum(r.wrong for r in ranked)
    fig.suptitle(f"the {len(ranked)} highest-loss test images, highest first ({wrong} wrong, in red)", fontsize=11)
    return fig


def plot_error_gallery(images: np.ndarray, ranked: list[Ranked], classes: list[str], path: Path) -> None:
    """errors.png: `error_gallery_figure`, or with no image a picture that says so."""
    if ranked:
        _save(error_gallery_figure(images, ranked, classes), path)
    else:
        _empty(path, "highest-loss test images", "no test images")


def confused_examples(
    logits: torch.Tensor, labels: torch.Tensor, pairs: list[tuple[int, int, int]], examples: int = PAIR_EXAMPLES
) -> list[list[Ranked]]:
    """For each (actual, predicted, count) pair, up to `examples` images of that mistake, highest loss first."""
    predicted = logits.argmax(dim=1)
    return [rank_by_loss(logits, labels, where=(labels == a) & (predicted == p), limit=examples) for a, p, _ in pairs]


def confused_pairs_figure(
    images: np.ndarray, pairs: list[tuple[int, int, int]], shown: list[list[Ranked]], classes: list[str]
) -> plt.Figure:
    """One row per pair (at least one): "A → B (n images)", then its examples, each titled with p(B)."""
    cols = max(len(row) for row in shown)  # no empty columns: few mistakes, a narrow picture
    cell, label_width, title_height = CELL * 0.8, 1.9, 0.6  # inches
    width, height = label_width + (cell + 0.1) * cols, (cell + 0.35) * len(pairs) + title_height
    fig, axes = plt.subplots(len(pairs), cols, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(
        left=label_width / width,
        right=0.99,
        top=1 - title_height / height,
        bottom=0.1 / height,
        wspace=0.1,
        hspace=0.35 / cell,
    )
    for row, (a, p, n), examples_of in zip(axes, pairs, shown, strict=True):
        for ax in row[len(examples_of) :]:
            ax.axis("off")
        for ax, r in zip(row, examples_of, strict=False):
            _thumbnail(ax, images[r.index], f"p={r.p_predicted:.2f}", WRONG, fontsize=8)
        actual, wrong = short_label(classes[a]), short_label(classes[p])
        pair = f"{actual} → {wrong}" if len(actual) + len(wrong) <= 18 else f"{actual}\n→ {wrong}"
        box = row[0].get_position()
        fig.text(
            0.1 / width,
            (box.y0 + box.y1) / 2,
            f"{pair}\n({n} image{'s' if n != 1 else ''})",
            ha="left",
            va="center",
            fontsize=9.5,
            linespacing=1.4,
        )
    fig.suptitle("most-confused pairs: actual → predicted", fontsize=11, x=0.02, ha="left")
    return fig


def plot_confused_pairs(
    images: np.ndarray,
    logits: torch.Tensor,
    labels: torch.Tensor,
    confusion: torch.Tensor | np.ndarray,
    classes: list[str],
    path: Path,
    top: int = PAIRS,
    examples: int = PAIR_EXAMPLES,
) -> list[tuple[int, int, int]]:
    """confused.png: the `top` most-confused pairs with up to `examples` images of each mistake. Returns the pairs
    drawn; none: the picture says the model made no mistake."""
    pairs = most_confused(confusion, top)
    if pairs:
        _save(confused_pairs_figure(images, pairs, confused_examples(logits, labels, pairs, examples), classes), path)
    else:
        _empty(path, "most-confused pairs", f"no mistakes: all {len(labels)} test images predicted right")
    return pairs
