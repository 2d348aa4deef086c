"""Calibration: does a 90%-confident prediction come true 90% of the time? The reliability diagram
(eval/calibration.png) and its per-bin records (eval/calibration.json, a DVC plot) beside the ECE of metrics.py.

The bins are torchmetrics' own (`multiclass_calibration_error`, which gives the ECE): the top-1 probability
bucketed with `torch.bucketize(right=True)` into 15 equal-width bins [k/15, (k+1)/15), plus one more that holds
only a confidence of exactly 1.0 (float32 softmax reaches it for a confident network). That last bin is kept as
torchmetrics keeps it, so the ECE these records add up to is the ECE in metrics.json, to rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.patches import Patch

from cnnpipe.evaluation.metrics import CALIBRATION_BINS
from cnnpipe.figures import plt, save_png


@dataclass(frozen=True)
class CalibrationBin:
    bin: int  # 0 .. n_bins - 1: [lower, upper); n_bins: confidence exactly 1.0
    lower: float
    upper: float
    confidence: float  # mean top-1 probability of the bin's images
    accuracy: float  # fraction of them predicted right
    count: int


def reliability_bins(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """The non-empty bins of the top-1 softmax probability, binned as torchmetrics bins it for the ECE."""
    if len(labels) == 0:
        return []
    confidence, predicted = logits.float().softmax(dim=1).max(dim=1)
    correct = predicted.eq(labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = torch.bucketize(confidence, edges, right=True) - 1  # n_bins: exactly 1.0
    count = torch.bincount(index, minlength=n_bins + 1)
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, index, confidence.double())
    acc_sum = torch.zeros(n_bins + 1, dtype=torch.float64).index_add_(0, index, correct.double())
    return [
        CalibrationBin(
            bin=i,
            lower=float(edges[min(i, n_bins)]),
            upper=float(edges[min(i + 1, n_bins)]),
            confidence=float(conf_sum[i] / count[i]),
            accuracy=float(acc_sum[i] / count[i]),
            count=int(count[i]),
        )
        for i in range(n_bins + 1)
        if count[i] > 0
    ]


def expected_calibration_error(bins: list[CalibrationBin]) -> float:
    """ECE (l1): the count-weighted mean gap between accuracy and confidence over the bins."""
    total = sum(b.count for b in bins)
    return sum(b.count * abs(b.accuracy - b.confidence) for b in bins) / total if total else 0.0


def calibration_records(bins: list[CalibrationBin]) -> list[dict[str, Any]]:
    """One record per non-empty bin, for DVC's plot templates (x: confidence, y: accuracy)."""
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(b).items()} for b in bins]


def plot_reliability(bins: list[CalibrationBin], ece: float, path: Path, n_bins: int = CALIBRATION_BINS) -> None:
    """Accuracy per confidence bin against the diagonal of perfect calibration, each bin's gap to its mean
    confidence in red, the bins' image counts below (log scale: a good model puts nearly all in the top bin)."""
    fig, (top, low) = plt.subplots(
        2, 1, figsize=(5.2, 5.9), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    fig.subplots_adjust(top=0.86)
    width = 1.0 / n_bins
    thin = width / 4  # the bin of confidence exactly 1.0, drawn as a thin bar at 1
    x = [b.lower for b in bins]
    widths = [width if b.bin < n_bins else thin for b in bins]
    colours = ["#4c78a8" if b.bin < n_bins else "#72b7b2" for b in bins]
    top.plot([0, 1], [0, 1], "--", color="0.45", lw=1, label="perfect calibration")
    top.bar(
        x, [b.accuracy for b in bins], width=widths, align="edge", color=colours, edgecolor="white", label="accuracy"
    )
    top.vlines(
        [b.confidence for b in bins],
        [b.accuracy for b in bins],
        [b.confidence for b in bins],
        color="#d62728",
        lw=2,
        label="gap to mean confidence",
    )
    handles, _ = top.get_legend_handles_labels()
    if any(b.bin == n_bins for b in bins):  # a legend entry for the thin bar
        handles.append(Patch(color="#72b7b2", label="confidence exactly 1.0"))
    top.set(ylim=(0, 1.02), ylabel="accuracy")
    fig.suptitle(f"reliability: ECE {ece:.4f} ({sum(b.count for b in bins)} images, {n_bins} bins)", fontsize=11)
    top.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False
    )  # over no bar
    top.grid(alpha=0.25)

    low.bar(x, [b.count for b in bins], width=widths, align="edge", color="0.55")
    if bins:
        low.set_yscale("log")
        low.set_ylim(0.7, max(b.count for b in bins) * 2)
    low.set(xlim=(0, 1 + thin), xlabel="confidence (top-1 probability)", ylabel="images")
    low.set_xticks(np.linspace(0, 1, 6))
    low.grid(alpha=0.25, axis="y")
    save_png(fig, path)
