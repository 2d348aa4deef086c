"""The drift report: report.md and its pictures, for a person deciding whether a served model needs attention.

Each picture shows what one family of tests compared (reference grey, window blue), titled with the test's
p-value; a title in red is a test that drifted. Nothing here decides anything: the DriftResult is the verdict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.atomic import write_text_atomic
from cnnpipe.figures import plt, save_png
from cnnpipe.monitoring.drift import EMBEDDING, INPUTS, DriftResult, DriftTest, Sample

__all__ = ["REPORT", "write_report"]

REPORT = "report.md"
REFERENCE_COLOUR = "#8c8c8c"
WINDOW_COLOUR = "#1f6fb4"
DRIFT_COLOUR = "#c0392b"
SCATTER_POINTS = 3000  # per sample in the embedding scatter: more only hides the window under the reference
LABEL_WIDTH = 18  # characters of a class name under a bar
ROW_CLASSES = 50  # classes per row of the class-share picture
MAX_ROWS = 6  # beyond ROW_CLASSES * MAX_ROWS classes, rows grow and their labels thin out

_HEADER = ("family", "test", "method", "statistic", "p", "threshold", "drift", "detail")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|$~>-])")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_WHITESPACE = re.compile(r"\s+")


def write_report(
    folder: Path, result: DriftResult, reference: Sample, window: Sample, classes: list[str], heading: list[str]
) -> list[Path]:
    """report.md and its pictures in `folder` (which exists). `heading`: lines shown under the title as plain
    text (escaped: a path or model name shows as itself). Returns the files written, report.md first.
    `reference` and `window` are the samples `result` was computed from."""
    folder = Path(folder)
    pictures: list[tuple[str, str, str]] = []  # (section title, file, how to read it)
    save_png(_inputs_figure(result, reference, window), folder / "inputs.png")
    pictures.append(("Inputs", "inputs.png", _INPUTS_NOTE))
    if result.tested("embedding"):
        save_png(_embedding_figure(result, reference, window), folder / "embedding.png")
        pictures.append(("Embedding", "embedding.png", _EMBEDDING_NOTE))
    save_png(_classes_figure(result, reference, window, classes), folder / "classes.png")
    pictures.append(("Predicted classes", "classes.png", _CLASSES_NOTE))
    save_png(_confidence_figure(result, reference, window), folder / "confidence.png")
    pictures.append(("Confidence", "confidence.png", _CONFIDENCE_NOTE))
    write_text_atomic(folder / REPORT, render_markdown(result, heading, pictures))
    return [folder / REPORT] + [folder / file for _, file, _ in pictures]


# --- markdown ----------------------------------------------------------------------------------------------

_INPUTS_NOTE = (
    "Brightness and contrast (mean and standard deviation of the pixels the network received, /255) as "
    "density histograms, and each window image's size as it arrived against the training images' range (box)."
)
_EMBEDDING_NOTE = (
    "The penultimate-layer embedding projected on the reference's principal components: the first two as a "
    "scatter, each component's cumulative distribution beside it (KS compares these curves: D is their widest gap)."
)
_CLASSES_NOTE = "The share of predictions per class."
_CONFIDENCE_NOTE = "The top class probability: density histogram and cumulative distribution."


def render_markdown(result: DriftResult, heading: Sequence[str], pictures: Sequence[tuple[str, str, str]]) -> str:
    """report.md's text: title, heading lines, verdict, every test, what was not applicable, the pictures."""
    head, sep, rest = result.verdict.partition(" (")
    verdict = f"**{head}**{sep}{rest}"  # the decision in bold, how it was decided after it
    lines = ["# Drift report", ""]
    lines += [f"{md_text(line)}  " for line in heading]  # two spaces: a line break, one paragraph
    lines += [
        "",
        f"Window: {result.window} predictions; reference: {result.reference} images.",
        "",
        verdict,
        "",
        "## Tests",
        "",
        "Each statistical test drifts when its p-value falls below the threshold, alpha divided by the number "
        f"of tests ({result.n_tests}), so that a window drawn from the reference's distribution raises a false "
        f"alarm with probability at most alpha = {result.alpha:g}. The size rule drifts when more than "
        f"{result.size_share:.1%} of the window's images lie outside the training images' width and height range.",
        "",
        _row(_HEADER),
        _row(("---",) * len(_HEADER)),
        *(_row(_cells(t)) for t in result.tests),
        "",
    ]
    if result.not_applicable:
        lines += ["Not applicable:", "", *(f"- {md_text(line)}" for line in result.not_applicable), ""]
    for title, file, note in pictures:
        lines += [f"## {title}", "", note, "", f"![{title.lower()}]({file})", ""]
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cells(t: DriftTest) -> tuple[str, ...]:
    threshold = f"p < {t.threshold:.3g}" if t.p_value is not None else f"share ≤ {t.threshold:.1%}"
    statistic = f"{t.statistic:.1%}" if t.p_value is None else f"{t.statistic:.4g}"
    return (
        t.family,
        t.name,  # names and methods are drift.py's own words; details carry class names: escaped
        t.method,
        statistic,
        format_p(t.p_value),
        threshold,
        "**yes**" if t.drift else "no",
        md_text(t.detail),
    )


def format_p(p: float | None) -> str:
    """A p-value to read: three decimals down to 0.001, then scientific; exact zero (underflow) as < 1e-300."""
    if p is None:
        return "–"
    if p == 0:
        return "< 1e-300"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def md_text(text: str) -> str:
    """`text` as literal markdown inline text, safe in a table cell: class names and paths are data."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = _LINE_BREAK.sub("<br>", text)
    return _CONTROL.sub(lambda m: f"\\\\x{ord(m.group()):02x}", text)


# --- pictures ----------------------------------------------------------------------------------------------


def _label(text: str, width: int = LABEL_WIDTH) -> str:
    """A class name in a picture: one line, about `width` characters, `$` shown as itself (not mathtext)."""
    text = _WHITESPACE.sub(" ", str(text)).strip()
    if len(text) > width:  # elided in the middle: names that share a prefix ("n0144 ...") stay apart
        head = width // 2
        text = text[:head].rstrip() + "…" + text[len(text) - (width - 1 - head) :].lstrip()
    return text.replace("$", r"\$")


def _title(ax: Any, what: str, test: DriftTest | None) -> None:
    """`what` and the test's p-value; red when it drifted."""
    if test is None:
        ax.set_title(what, fontsize=10)
        return
    verdict = "drift" if test.drift else "no drift"
    ax.set_title(
        f"{what}\nKS p = {format_p(test.p_value)} ({verdict})" if test.method.startswith("two-sample") else what,
        fontsize=10,
        color=DRIFT_COLOUR if test.drift else "black",
    )


def _array(sample: Sample, key: str) -> np.ndarray:
    return np.asarray(sample[key], dtype=np.float64)


def _histograms(ax: Any, ref: np.ndarray, win: np.ndarray, bins: int = 30) -> None:
    """Reference filled grey, window as a blue outline, both density-normalised on common bins."""
    low, high = float(min(ref.min(), win.min())), float(max(ref.max(), win.max()))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    ax.hist(ref, bins=edges, density=True, color=REFERENCE_COLOUR, alpha=0.6, label=f"reference ({len(ref)})")
    ax.hist(
        win, bins=edges, density=True, histtype="step", linewidth=1.8, color=WINDOW_COLOUR, label=f"window ({len(win)})"
    )
    ax.set_ylabel("density")


def _ecdf(ax: Any, ref: np.ndarray, win: np.ndarray) -> None:
    for values, colour, width in ((ref, REFERENCE_COLOUR, 2.2), (win, WINDOW_COLOUR, 1.4)):
        x = np.sort(values)
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", color=colour, linewidth=width)
    ax.set_ylim(0, 1.02)


def _inputs_figure(result: DriftResult, reference: Sample, window: Sample) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name in zip(axes[:2], INPUTS, strict=True):
        _histograms(ax, _array(reference, name), _array(window, name))
        ax.set_xlabel(f"{name} (/255)")
        _title(ax, name, result.test("input", name))
    axes[0].legend(fontsize=8)
    _sizes(axes[2], result, reference, window)
    fig.tight_layout()
    return fig


def _sizes(ax: Any, result: DriftResult, reference: Sample, window: Sample) -> None:
    """Window image sizes (one dot per distinct size, its area by count) and the training range as a box (a
    square marker where the training images all have one size)."""
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    low, high = _size_range(reference)
    sizes, counts = np.unique(
        np.stack([_array(window, "width"), _array(window, "height")], axis=1), axis=0, return_counts=True
    )
    inside = (sizes >= low).all(axis=1) & (sizes <= high).all(axis=1)
    area = 20 + 300 * counts / counts.max()
    if (high > low).all():
        box = Rectangle(tuple(low), *(high - low), facecolor="#eeeeee", edgecolor="black", label="training range")
        ax.add_patch(box)
    else:
        ax.plot([low[0], high[0]], [low[1], high[1]], "s-", color="black", markersize=18, markerfacecolor="none")
        ax.plot([], [], "s", color="black", markerfacecolor="none", label="training size")
    for keep, colour, label in ((inside, WINDOW_COLOUR, "window, inside"), (~inside, DRIFT_COLOUR, "window, outside")):
        if keep.any():
            ax.scatter(sizes[keep, 0], sizes[keep, 1], s=area[keep], color=colour, alpha=0.7, label=label)
    span = np.concatenate([sizes, low[None], high[None]])
    pad = np.maximum(1.0, 0.08 * (span.max(axis=0) - span.min(axis=0)))
    ax.set_xlim(span[:, 0].min() - pad[0], span[:, 0].max() + pad[0])
    ax.set_ylim(span[:, 1].min() - pad[1], span[:, 1].max() + pad[1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="width (px, as it arrived)", ylabel="height (px)")
    legend = ax.legend(fontsize=7, loc="best")
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([30])  # the legend's dots one size: their area means a count only in the plot
    rule = result.test("size", "width x height")
    drifted = rule is not None and rule.drift
    share = f"{rule.statistic:.1%} outside" if rule is not None else ""
    ax.set_title(
        f"image size\n{share} ({'drift' if drifted else 'no drift'})",
        fontsize=10,
        color=DRIFT_COLOUR if drifted else "black",
    )


def _size_range(reference: Sample) -> tuple[np.ndarray, np.ndarray]:
    """[width, height] smallest and largest of the training images, as drift.py's size rule takes them."""
    if reference.get("size_min") is not None and reference.get("size_max") is not None:
        return np.asarray(reference["size_min"], dtype=np.float64), np.asarray(reference["size_max"], dtype=np.float64)
    width, height = _array(reference, "width"), _array(reference, "height")
    return np.array([width.min(), height.min()]), np.array([width.max(), height.max()])


def _embedding_figure(result: DriftResult, reference: Sample, window: Sample) -> Any:
    ref, win = _array(reference, EMBEDDING), _array(window, EMBEDDING)
    k = ref.shape[1]
    columns = math.ceil(k / 2)
    fig = plt.figure(figsize=(4.5 + 2.8 * columns, 5.2))
    grid = fig.add_gridspec(2, 1 + columns, width_ratios=[1.6] + [1] * columns)
    if k >= 2:
        ax = fig.add_subplot(grid[:, 0])
        rng = np.random.default_rng(0)  # the same points each time the report is drawn
        for values, colour, size, alpha, label in (
            (ref, REFERENCE_COLOUR, 6, 0.5, "reference"),
            (win, WINDOW_COLOUR, 14, 0.8, "window"),
        ):
            if len(values) > SCATTER_POINTS:
                shown = values[rng.choice(len(values), SCATTER_POINTS, replace=False)]
            else:
                shown = values
            ax.scatter(
                shown[:, 0], shown[:, 1], s=size, color=colour, alpha=alpha, lw=0, label=f"{label} ({len(values)})"
            )
        ax.set(xlabel="pc1", ylabel="pc2")
        ax.legend(fontsize=8, markerscale=2)
        ax.set_title("embedding, first two components", fontsize=10)
    for j in range(k):
        ax = fig.add_subplot(grid[j % 2, 1 + j // 2])
        _ecdf(ax, ref[:, j], win[:, j])
        _title(ax, f"pc{j + 1}", result.test("embedding", f"pc{j + 1}"))
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def _classes_figure(result: DriftResult, reference: Sample, window: Sample, classes: list[str]) -> Any:
    """Side-by-side bars per class, in class order; many classes wrap onto rows of at most ROW_CLASSES (a
    single strip of 100 pairs of bars is too flat to read when shown at page width)."""
    n = len(classes)
    shares = [_shares(sample, n) for sample in (reference, window)]
    rows = min(MAX_ROWS, math.ceil(n / ROW_CLASSES))
    per_row = math.ceil(n / rows)
    width_in = min(24.0, max(6.0, 1.5 + 0.22 * per_row))
    fig, axes = plt.subplots(rows, 1, figsize=(width_in, 1.0 + 3.2 * rows), sharey=True, squeeze=False)
    fontsize = 8 if per_row <= 30 else 7
    step = max(1, math.ceil(per_row / (width_in * 72 / (fontsize * 1.6))))  # labels that fit side by side
    rotation = 0 if per_row <= 10 and max(len(_label(c)) for c in classes) <= 8 else 90
    for row, ax in enumerate(axes[:, 0]):
        x = np.arange(row * per_row, min(n, (row + 1) * per_row))
        ax.bar(x - 0.2, shares[0][x], width=0.4, color=REFERENCE_COLOUR, label=f"reference ({result.reference})")
        ax.bar(x + 0.2, shares[1][x], width=0.4, color=WINDOW_COLOUR, label=f"window ({result.window})")
        shown = x[::step]
        ax.set_xticks(shown, [_label(classes[i]) for i in shown], rotation=rotation, fontsize=fontsize)
        ax.set_xlim(x[0] - 0.7, x[0] + per_row - 0.3)
        ax.set_ylabel("share of predictions")
    axes[0, 0].legend(fontsize=8)
    test = result.test("classes", "predicted class")
    drifted = test is not None and test.drift
    p = format_p(test.p_value) if test is not None else "–"
    axes[0, 0].set_title(
        f"predicted class: chi-squared p = {p} ({'drift' if drifted else 'no drift'})"
        + (f"; one class in {step} named" if step > 1 else ""),
        fontsize=10,
        color=DRIFT_COLOUR if drifted else "black",
    )
    fig.tight_layout()
    return fig


def _shares(sample: Sample, n: int) -> np.ndarray:
    predicted = np.asarray(sample["predicted"]).astype(np.int64)
    counts = np.bincount(predicted, minlength=n)
    if len(counts) != n:
        raise ValueError(f"predicted class {predicted.max()} for {n} class names")
    return counts / counts.sum()


def _confidence_figure(result: DriftResult, reference: Sample, window: Sample) -> Any:
    ref, win = _array(reference, "confidence"), _array(window, "confidence")
    test = result.test("confidence", "confidence")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    _histograms(axes[0], ref, win)
    axes[0].legend(fontsize=8)
    _ecdf(axes[1], ref, win)
    axes[1].set_ylabel("share of images at or below")
    for ax in axes:
        ax.set_xlabel("confidence (top class probability)")
    _title(axes[0], "confidence", test)
    axes[1].set_title("cumulative distribution\n(KS D: the widest vertical gap)", fontsize=10)
    fig.tight_layout()
    return fig
