"""A fit's per-epoch history as the train stage publishes it: history.csv, and curves.png (written atomically)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cnnpipe.figures import plt, save_png

HISTORY_COLUMNS = ("epoch", "train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro", "lr")


def history_csv(rows: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (int(row[k]) if k == "epoch" else round(row[k], 6)) for k in HISTORY_COLUMNS if k in row})
    return buf.getvalue()


def plot_curves(rows: list[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch, train vs val."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in rows]
    for key, ax in (
        ("train/loss", ax_loss),
        ("val/loss", ax_loss),
        ("train/acc", ax_acc),
        ("val/acc", ax_acc),
        ("val/f1_macro", ax_acc),
    ):
        values = [r.get(key, np.nan) for r in rows]
        ax.plot(epochs, values, marker=".", label=key)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy, macro F1", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    save_png(fig, path)
