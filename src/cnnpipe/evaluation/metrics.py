"""The test-split metric suite, all from torchmetrics, and its tables (per_class.csv, confusion records)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

TOP_K = (3, 5)  # top-k accuracies reported when the class count makes them informative (see `top_k_values`)
CALIBRATION_BINS = 15  # equal-width bins of the top-1 probability, for the ECE and the reliability diagram


def top_k_values(num_classes: int) -> list[int]:
    """The k of TOP_K worth reporting for `num_classes` classes: k < C / 2, so that being in the top k is not
    nearly guaranteed (10 digits: top-3 only; 2 classes: none)."""
    return [k for k in TOP_K if num_classes > 2 * k]


@dataclass
class TestMetrics:
    summary: dict[str, float]  # acc, f1_macro, precision_macro, recall_macro, ece, loss, then top3_acc, top5_acc
    per_class: dict[str, list[float]]  # precision, recall, f1, support — one value per class
    confusion: torch.Tensor  # (C, C): rows actual, columns predicted


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> TestMetrics:
    """Micro accuracy, macro precision/recall/F1, per-class scores, confusion, 15-bin ECE, loss, and the top-k
    accuracies that `top_k_values` finds meaningful for the class count."""
    c = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    summary = {
        "acc": multiclass_accuracy(probs, labels, c, average="micro"),
        "f1_macro": multiclass_f1_score(probs, labels, c, average="macro"),
        "precision_macro": multiclass_precision(probs, labels, c, average="macro"),
        "recall_macro": multiclass_recall(probs, labels, c, average="macro"),
        "ece": multiclass_calibration_error(probs, labels, c, n_bins=CALIBRATION_BINS, norm="l1"),
        "loss": F.cross_entropy(logits.float(), labels),
    }
    for k in top_k_values(c):
        summary[f"top{k}_acc"] = multiclass_accuracy(probs, labels, c, top_k=k, average="micro")
    per_class = {
        "precision": multiclass_precision(probs, labels, c, average=None),
        "recall": multiclass_recall(probs, labels, c, average=None),
        "f1": multiclass_f1_score(probs, labels, c, average=None),
        "support": torch.bincount(labels, minlength=c).float(),
    }
    return TestMetrics(
        summary={k: round(float(v), 6) for k, v in summary.items()},
        per_class={k: [round(float(x), 6) for x in v] for k, v in per_class.items()},
        confusion=multiclass_confusion_matrix(probs, labels, c),
    )


@torch.no_grad()
def predict_logits(
    net: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Logits for uint8 images (N, C, H, W), batched, on `device`."""
    net = net.to(device).eval()
    out = [
        net(images[i : i + batch_size].to(device).float().div_(255.0)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, 0)


# Class names are data (image folder names): `c++`, `cat&dog`, `a|b`, a newline... MLflow accepts in metric names
# only word characters, `_ - . / :` and spaces, and no `.`/`..` path segments. A name becomes one path segment:
# kept as it is when it already fits (`test/f1/cat`, `test/f1/7`), else every other character becomes `_` and a
# short hash of the true name follows (`test/f1/c__-5d0e8f`), so names stay distinct and stable across runs.
_METRIC_UNSAFE = re.compile(r"[^\w.\- ]")  # `/` and `:` too: one segment, and Windows-safe
_METRIC_SEGMENT_MAX = 120  # MLflow keys hold 250 characters


def metric_segment(name: str) -> str:
    """`name` as one segment of an MLflow metric name: itself if it is safe, else sanitised plus a hash."""
    safe = _METRIC_UNSAFE.sub("_", name)
    if safe == name and safe.strip(".") and len(safe) <= _METRIC_SEGMENT_MAX:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:6]
    return f"{safe[:_METRIC_SEGMENT_MAX]}-{digest}"


def per_class_metric_names(prefix: str, classes: list[str]) -> list[str]:
    """One distinct MLflow metric name per class, `prefix/<segment>` (see `metric_segment`)."""
    names = [f"{prefix}/{metric_segment(str(c))}" for c in classes]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # two names sanitised alike keep their hashes apart; a clash left: the index
        if name in seen:
            names[i] = f"{name}-{i}"
        seen[names[i]] = i
    return names


def per_class_csv(m: TestMetrics, classes: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    for i, name in enumerate(classes):
        writer.writerow(
            [
                name,
                m.per_class["precision"][i],
                m.per_class["recall"][i],
                m.per_class["f1"][i],
                int(m.per_class["support"][i]),
            ]
        )
    return buf.getvalue()


def confusion_records(labels: torch.Tensor, preds: torch.Tensor, classes: list[str]) -> list[dict[str, str]]:
    """One record per test sample, the shape DVC's `confusion` plot template reads."""
    return [
        {"actual": classes[a], "predicted": classes[p]} for a, p in zip(labels.tolist(), preds.tolist(), strict=True)
    ]
