"""The test-split metric suite against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cnnpipe.evaluation.metrics import classification_metrics, predict_logits


def confident(predicted: list[int], classes: int, margin: float) -> torch.Tensor:
    """Logits with `margin` on the predicted class, 0 elsewhere."""
    return F.one_hot(torch.tensor(predicted), classes).float() * margin


def test_perfect_predictions() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    m = classification_metrics(confident(labels.tolist(), 3, 100.0), labels)
    for key in ("acc", "f1_macro", "precision_macro", "recall_macro"):
        assert m.summary[key] == 1.0, key
    assert m.summary["ece"] == 0.0  # one-hot confident and right: confidence 1 = accuracy 1
    assert m.summary["loss"] == pytest.approx(0.0, abs=1e-6)
    assert m.per_class["precision"] == m.per_class["recall"] == m.per_class["f1"] == [1.0, 1.0, 1.0]
    assert torch.equal(m.confusion, torch.diag(torch.tensor([3, 2, 1])))


def test_known_confusion() -> None:
    # actual 0 0 0 1 1 2 / predicted 0 0 1 1 2 2
    #   class 0: tp 2, fp 0, fn 1 -> precision 1,   recall 2/3, f1 0.8
    #   class 1: tp 1, fp 1, fn 1 -> precision 1/2, recall 1/2, f1 1/2
    #   class 2: tp 1, fp 1, fn 0 -> precision 1/2, recall 1,   f1 2/3
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    margin = 5.0
    m = classification_metrics(confident([0, 0, 1, 1, 2, 2], 3, margin), labels)
    assert m.summary["acc"] == pytest.approx(4 / 6, abs=1e-6)
    assert m.per_class["precision"] == pytest.approx([1.0, 0.5, 0.5], abs=1e-6)
    assert m.per_class["recall"] == pytest.approx([2 / 3, 0.5, 1.0], abs=1e-6)
    assert m.per_class["f1"] == pytest.approx([0.8, 0.5, 2 / 3], abs=1e-6)
    assert m.summary["precision_macro"] == pytest.approx(2 / 3, abs=1e-6)
    assert m.summary["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3, abs=1e-6)
    assert m.summary["f1_macro"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3, abs=1e-6)
    assert m.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # every prediction has confidence p = e^5 / (e^5 + 2) and they fall in one bin: ECE = |p - 4/6|
    p = math.exp(margin) / (math.exp(margin) + 2)
    assert m.summary["ece"] == pytest.approx(abs(p - 4 / 6), abs=1e-5)
    # cross-entropy: -log p for the 4 right ones, -log((1 - p) / 2) for the 2 wrong ones
    loss = (4 * -math.log(p) + 2 * -math.log((1 - p) / 2)) / 6
    assert m.summary["loss"] == pytest.approx(loss, abs=1e-5)


def test_support_and_confusion_rows_are_actual_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (50,), generator=gen)
    logits = torch.randn(50, 4, generator=gen)
    m = classification_metrics(logits, labels)
    assert sum(m.per_class["support"]) == 50
    assert m.per_class["support"] == torch.bincount(labels, minlength=4).float().tolist()
    assert m.confusion.shape == (4, 4)
    assert m.confusion.sum(1).tolist() == torch.bincount(labels, minlength=4).tolist()  # rows: actual
    assert m.confusion.sum(0).tolist() == torch.bincount(logits.argmax(1), minlength=4).tolist()  # cols: predicted
    assert m.summary["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)
    assert m.summary["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    assert 0.0 <= m.summary["ece"] <= 1.0


def test_summary_and_per_class_are_plain_floats() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    m = classification_metrics(confident([0, 1, 0, 0], 2, 3.0), labels)
    assert set(m.summary) == {"acc", "f1_macro", "precision_macro", "recall_macro", "ece", "loss"}
    assert set(m.per_class) == {"precision", "recall", "f1", "support"}
    assert all(type(v) is float for v in m.summary.values())
    assert all(len(v) == 2 and all(type(x) is float for x in v) for v in m.per_class.values())


def test_class_never_seen_in_the_test_split() -> None:
    # class 2 never occurs and is never predicted: its row and column are zero, its support 0
    labels = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(confident([0, 1, 1, 1], 3, 5.0), labels)
    assert m.per_class["support"] == [2.0, 2.0, 0.0]
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert m.summary["acc"] == pytest.approx(0.75, abs=1e-6)
    assert m.per_class["precision"][:2] == pytest.approx([1.0, 2 / 3], abs=1e-6)
    assert m.per_class["recall"][:2] == pytest.approx([0.5, 1.0], abs=1e-6)


def test_predict_logits_batches_and_scales() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    images = torch.randint(0, 256, (10, 1, 2, 2), dtype=torch.uint8)
    out = predict_logits(net, images, batch_size=3)
    assert out.shape == (10, 3)
    with torch.no_grad():
        assert torch.allclose(out, net(images.float() / 255.0), atol=1e-6)
    assert predict_logits(net, images[:0]).numel() == 0


@pytest.mark.parametrize(
    ("classes", "top_k"), [(2, []), (6, []), (7, [3]), (10, [3]), (11, [3, 5])], ids=lambda v: str(v)
)
def test_top_k_accuracy_by_hand_only_where_the_class_count_makes_it_informative(classes: int, top_k: list[int]) -> None:
    """top-k for k < C / 2: with 6 classes the top 3 hold half of them, an easy score that says little."""
    gen = torch.Generator().manual_seed(classes)
    labels = torch.randint(0, classes, (200,), generator=gen)
    logits = torch.randn(200, classes, generator=gen)
    logits[torch.arange(200), labels] += 1.0  # better than chance, short of perfect
    m = classification_metrics(logits, labels)
    assert list(m.summary) == ["acc", "f1_macro", "precision_macro", "recall_macro", "ece", "loss"] + [
        f"top{k}_acc" for k in top_k
    ]
    order = (-logits.numpy()).argsort(axis=1)
    for k in top_k:
        hand = sum(int(y) in row[:k] for y, row in zip(labels.tolist(), order, strict=True)) / 200
        assert m.summary[f"top{k}_acc"] == pytest.approx(hand, abs=1e-6)
        assert m.summary["acc"] < m.summary[f"top{k}_acc"] < 1.0
