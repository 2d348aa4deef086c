"""Drift monitoring's statistics and report (cnnpipe.monitoring.drift, .report) on real images: scikit-learn's
8x8 digits, split into a reference half and a held-out half. A fixed stand-in for the network (nearest class
mean on the pixels, softmax of negative distances; an embedding on the reference half's top principal axes)
turns images into the Sample the monitor reads, so every change to the images reaches every family of tests."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_digits

from cnnpipe.errors import ConfigError, DataError
from cnnpipe.monitoring.drift import MIN_WINDOW, DriftResult, detect_drift
from cnnpipe.monitoring.report import REPORT, md_text, write_report

ALPHA = 0.01
WINDOW = 100
AXES = 4
CLASSES = [str(d) for d in range(10)]


@dataclass(frozen=True)
class Digits:
    """The digits split once (seeded), the stand-in network fitted on the reference half."""

    reference_images: np.ndarray  # (N, 8, 8) uint8
    held: np.ndarray  # (M, 8, 8) uint8, never seen by the fit
    held_labels: np.ndarray
    mean: np.ndarray  # (64,)
    axes: np.ndarray  # (AXES, 64)
    centres: np.ndarray  # (10, 64)

    def sample(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """What the monitor would log for these uint8 images."""
        x = images.reshape(len(images), -1).astype(np.float64) / 255
        distance = np.sqrt(((x[:, None, :] - self.centres[None]) ** 2).sum(axis=-1))
        logits = -4 * distance
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        n = len(images)
        return {
            "brightness": x.mean(axis=1),
            "contrast": x.std(axis=1),
            "width": np.full(n, images.shape[2]),
            "height": np.full(n, images.shape[1]),
            "confidence": probs.max(axis=1),
            "predicted": probs.argmax(axis=1),
            "embedding": (x - self.mean) @ self.axes.T,
        }

    @property
    def reference(self) -> dict[str, np.ndarray]:
        return self.sample(self.reference_images)

    def window(self, rng: np.random.Generator, size: int = WINDOW) -> np.ndarray:
        return self.held[rng.choice(len(self.held), size, replace=False)]


@cache
def digits() -> Digits:
    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    ref, held = order[: len(order) // 2], order[len(order) // 2 :]
    x = images[ref].reshape(len(ref), -1) / 255
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    centres = np.stack([x[data.target[ref] == c].mean(axis=0) for c in range(10)])
    return Digits(images[ref], images[held], data.target[held], mean, vt[:AXES], centres)


def drift_of(images: np.ndarray) -> DriftResult:
    d = digits()
    return detect_drift(d.reference, d.sample(images), 10)


def rates(transform: Callable[[np.ndarray], np.ndarray], windows: int, seed: int) -> tuple[float, dict[str, float]]:
    """Share of `windows` random held-out windows (transformed) that drift, overall and per family."""
    rng = np.random.default_rng(seed)
    results = [drift_of(transform(digits().window(rng))) for _ in range(windows)]
    families = {f: float(np.mean([r.families[f] for r in results])) for f in results[0].families}
    return float(np.mean([r.drift for r in results])), families


# --- same distribution: false alarms ---------------------------------------------------------------------


def test_same_distribution_false_alarm_rate_and_bonferroni() -> None:
    """Windows of held-out digits are the reference's distribution: the family-wise false-alarm rate is at most
    alpha in expectation (measured 0.6% over 1,000 windows at alpha 1%; asserted with margin over 200 seeded
    ones). p-values between alpha/m and alpha occur and do not drift: the correction is applied."""
    rng = np.random.default_rng(1)
    results = [drift_of(digits().window(rng)) for _ in range(200)]
    rate = float(np.mean([r.drift for r in results]))
    print(f"false-alarm rate over {len(results)} same-distribution windows of {WINDOW}: {rate:.3f}")
    assert rate <= 0.03
    between = [t for r in results for t in r.tests if t.p_value is not None and ALPHA / 8 <= t.p_value < ALPHA]
    assert between, "no p-value between alpha/m and alpha in 200 windows: the case below is untested"
    assert not any(t.drift for t in between)


def test_threshold_is_alpha_over_the_tests_run() -> None:
    """Bonferroni over what actually ran: 2 inputs + 4 components + confidence + classes = 8; without an
    embedding 4. Every test drifts exactly when p < alpha / m; the size rule has its own threshold."""
    d = digits()
    window = d.sample(d.window(np.random.default_rng(2)))
    for sample, m in ((window, 8), ({k: v for k, v in window.items() if k != "embedding"}, 4)):
        result = detect_drift(d.reference, sample, 10, alpha=0.05, size_share=0.03)
        assert result.n_tests == m and result.threshold == pytest.approx(0.05 / m)
        components = [f"pc{j}" for j in range(1, AXES + 1)] if m == 8 else []
        order = ["width x height", "brightness", "contrast", *components, "predicted class", "confidence"]
        assert [t.name for t in result.tests] == order  # family by family, components in order
        for t in result.tests:
            if t.p_value is None:
                assert (t.family, t.threshold, t.drift) == ("size", 0.03, t.statistic > 0.03)
            else:
                assert t.threshold == pytest.approx(0.05 / m)
                assert t.drift == (t.p_value < t.threshold)
                assert 0 <= t.p_value <= 1 and t.statistic >= 0


# --- changed distributions: detections -------------------------------------------------------------------


def test_inverted_images_are_detected_by_the_inputs() -> None:
    rate, families = rates(lambda x: 255 - x, windows=20, seed=3)
    print(f"inverted: drift in {rate:.0%} of windows; by family {families}")
    assert rate == 1 and families["input"] == 1
    result = drift_of(255 - digits().window(np.random.default_rng(3)))
    brightness = result.test("input", "brightness")
    assert brightness is not None and brightness.p_value is not None and brightness.p_value < 1e-20
    means = [float(v) for v in re.findall(r"(\d\.\d+) \(sd", brightness.detail)]
    assert len(means) == 2 and means[0] > 0.6 > 0.4 > means[1]  # window bright, reference dark
    assert result.verdict.startswith("DRIFT: input")


def test_blurred_images_are_detected() -> None:
    """A 3x3 box blur (a soft camera) lowers contrast and moves the embedding; slight blur (sigma 0.5) too."""
    for name, blur in (
        ("box 3x3", lambda x: ndimage.uniform_filter(x, size=(1, 3, 3))),
        ("gaussian sigma 0.5", lambda x: ndimage.gaussian_filter(x, sigma=(0, 0.5, 0.5))),
    ):
        rate, families = rates(blur, windows=20, seed=4)
        print(f"blur {name}: drift in {rate:.0%} of windows; by family {families}")
        assert rate == 1 and max(families["input"], families["embedding"]) == 1
    contrast = drift_of(ndimage.uniform_filter(digits().window(np.random.default_rng(4)), size=(1, 3, 3))).test(
        "input", "contrast"
    )
    assert contrast is not None and contrast.drift


def test_one_class_only_is_detected_by_the_classes_family() -> None:
    d = digits()
    threes = d.held[d.held_labels == 3][:60]
    result = detect_drift(d.reference, d.sample(threes), 10, class_names=[f"digit {c}" for c in CLASSES])
    classes = result.test("classes", "predicted class")
    assert classes is not None and classes.drift and result.families["classes"]
    assert classes.p_value is not None and classes.p_value < 1e-20
    assert "largest change: class digit 3, window 9" in classes.detail  # ~90% of the window vs ~10% before


def test_rare_classes_are_pooled_so_many_classes_do_not_raise_false_alarms() -> None:
    """100 classes, skewed shares, windows of 30: most expected counts are far below 5, where the plain
    chi-squared p-value is too small (18% false alarms at a nominal 0.1% measured without pooling)."""
    rng = np.random.default_rng(5)
    shares = np.exp(-5 * np.arange(100) / 100)
    shares /= shares.sum()
    d = digits()
    reference = {**d.reference, "predicted": rng.choice(100, len(d.reference_images), p=shares)}
    drifted = []
    for _ in range(300):
        window = {**d.sample(d.window(rng, 30)), "predicted": rng.choice(100, 30, p=shares)}
        test = detect_drift(reference, window, 100).test("classes", "predicted class")
        assert test is not None and "pooled" in test.detail
        drifted.append(test.drift)
    print(f"classes family false alarms, 100 classes, windows of 30: {np.mean(drifted):.3f}")
    assert np.mean(drifted) <= 0.01


def test_size_rule() -> None:
    """Sizes outside the training range: more than size_share of the window is drift (on the size family only);
    exactly size_share is not; sizes inside a stated range are not."""
    d = digits()
    window = d.sample(d.window(np.random.default_rng(6)))

    def sized(width: list[int], height: list[int], reference: dict | None = None) -> DriftResult:
        w, h = window["width"].copy(), window["height"].copy()
        w[: len(width)], h[: len(height)] = width, height
        return detect_drift(reference or d.reference, {**window, "width": w, "height": h}, 10)

    two = sized([16, 8], [16, 4])
    rule = two.test("size", "width x height")
    assert rule is not None and rule.drift and rule.statistic == 0.02 and rule.p_value is None
    assert two.drifted == ["size"] and "2 of 100" in rule.detail and "e.g. 16x16" in rule.detail
    one = sized([16], [16]).test("size", "width x height")
    assert one is not None and one.statistic == 0.01 and not one.drift
    assert not sized([], []).drift

    stated = {k: v for k, v in d.reference.items() if k not in ("width", "height")}  # image folders: a range only
    stated |= {"size_min": np.array([8, 8]), "size_max": np.array([640, 480])}
    assert not sized([640, 100, 8], [480, 8, 100], stated).families["size"]
    outside = sized([641, 100], [480, 7], stated).test("size", "width x height")
    assert outside is not None and outside.drift and "8..640 x 8..480" in outside.detail


# --- awkward samples -------------------------------------------------------------------------------------


def constant(n: int, value: float = 0.5, confidence: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "brightness": np.full(n, value),
        "contrast": np.full(n, 0.1),
        "width": np.full(n, 8),
        "height": np.full(n, 8),
        "confidence": np.full(n, confidence),
        "predicted": np.zeros(n, dtype=int),
        "embedding": np.zeros((n, 3)),
    }


def test_constant_and_tied_samples_give_p_values_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = detect_drift(constant(200), constant(50), 10)
        assert not same.drift
        assert all(t.p_value == 1.0 for t in same.tests if t.p_value is not None)
        assert "every prediction is class 0" in same.test("classes", "predicted class").detail
        moved = detect_drift(constant(200), constant(50, value=0.6, confidence=0.9), 10)
        assert moved.drifted == ["input", "confidence"]
        assert all(np.isfinite([t.statistic, t.p_value]).all() for t in moved.tests if t.p_value is not None)
        # discrete data: real confidences rounded to 2 decimals, many ties on both sides
        d = digits()
        rounded = {**d.reference, "confidence": np.round(d.reference["confidence"], 2)}
        window = d.sample(d.window(np.random.default_rng(7)))
        tied = detect_drift(rounded, {**window, "confidence": np.round(window["confidence"], 2)}, 10)
        assert all(np.isfinite(t.p_value) for t in tied.tests if t.p_value is not None)


def test_samples_that_cannot_be_tested_are_refused_in_one_line() -> None:
    d = digits()
    reference, window = d.reference, d.sample(d.window(np.random.default_rng(8)))

    def cut(sample: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in sample.items()}

    detect_drift(reference, cut(window, MIN_WINDOW), 10)  # the smallest window allowed
    refusals = [
        (reference, cut(window, MIN_WINDOW - 1), "the window holds 29 images; drift tests need at least 30"),
        (cut(reference, MIN_WINDOW - 1), window, "the reference holds 29 images"),
        (reference, {**window, "embedding": window["embedding"][:, :3]}, "3 components, the reference's 4"),
        (reference, {k: v for k, v in window.items() if k != "confidence"}, "the window has no 'confidence'"),
        (reference, {**window, "predicted": window["predicted"] + 5}, "outside the model's 0..9"),
        (reference, {**window, "brightness": np.where(window["brightness"] > 0.3, np.nan, 0.3)}, "nan"),
        (reference, {**window, "width": window["width"][:-1]}, "'width' has shape (99,)"),
    ]
    for ref, win, message in refusals:
        with pytest.raises(DataError, match=re.escape(message)) as caught:
            detect_drift(ref, win, 10)
        assert "\n" not in str(caught.value)
    for setting in ({"alpha": 0.0}, {"alpha": 1.0}, {"size_share": 1.0}, {"size_share": -0.1}):
        with pytest.raises(ConfigError, match=next(iter(setting))):
            detect_drift(reference, window, 10, **setting)


def test_a_missing_embedding_is_not_applicable_and_the_rest_still_runs() -> None:
    d = digits()
    window = d.sample(d.window(np.random.default_rng(9)))
    no_embedding = {k: v for k, v in window.items() if k != "embedding"}
    for reference, sample, who in (
        (d.reference, no_embedding, "the window"),
        ({k: v for k, v in d.reference.items() if k != "embedding"}, window, "the reference"),
    ):
        result = detect_drift(reference, sample, 10)
        assert list(result.families) == ["size", "input", "classes", "confidence"]
        assert len(result.not_applicable) == 1
        assert (
            result.not_applicable[0].startswith("embedding drift: not applicable") and who in result.not_applicable[0]
        )
    inverted = no_embedding | {"brightness": 1 - window["brightness"]}
    assert detect_drift(d.reference, inverted, 10).drifted == ["input"]


# --- the report ------------------------------------------------------------------------------------------


def linked_files(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_report_names_every_test_and_its_pictures_exist(tmp_path: Path) -> None:
    d = digits()
    window = d.sample(255 - d.window(np.random.default_rng(10)))
    result = detect_drift(d.reference, window, 10)
    heading = ["model: digits_cnn v3 (run `abc`)", "log: /var/log/pred|ictions.db, 2024-05-01 .. 2024-05-02"]
    written = write_report(tmp_path, result, d.reference, window, CLASSES, heading)
    assert [p.name for p in written] == [REPORT, "inputs.png", "embedding.png", "classes.png", "confidence.png"]
    text = (tmp_path / REPORT).read_text(encoding="utf-8")
    assert f"**DRIFT: {', '.join(result.drifted)}**" in text
    assert all(md_text(line) in text for line in heading) and "digits\\_cnn" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(result.tests)  # header, rule, one row per test
    for t, row in zip(result.tests, table[2:], strict=True):
        assert row.startswith(f"| {t.family} | {t.name} | {t.method} |")
        assert ("**yes**" in row) == t.drift
    summary = json.loads(json.dumps(result.as_dict()))  # what a caller logs or writes beside the report
    assert summary["verdict"] == result.verdict and summary["families"] == result.families
    assert len(summary["tests"]) == len(result.tests) and summary["threshold"] == result.threshold
    links = linked_files(text)
    assert sorted(links) == sorted(p.name for p in written[1:])
    for link in links:
        with Image.open(tmp_path / link) as picture:
            picture.verify()
        with Image.open(tmp_path / link) as picture:
            assert picture.format == "PNG" and min(picture.size) > 200


def test_report_without_embedding_and_with_many_classes(tmp_path: Path) -> None:
    """No embedding: no embedding picture, the not-applicable line instead. 100 classes (names with markdown
    and mathtext characters) still draw; the report says no drift for a same-distribution window."""
    d = digits()
    window = {k: v for k, v in d.sample(d.window(np.random.default_rng(11))).items() if k != "embedding"}
    classes = [f"class_{i} $x$ | *{i}*" for i in range(100)]
    result = detect_drift(d.reference, window, 100, class_names=classes)
    written = write_report(tmp_path, result, d.reference, window, classes, ["model m"])
    assert [p.name for p in written] == [REPORT, "inputs.png", "classes.png", "confidence.png"]
    text = (tmp_path / REPORT).read_text(encoding="utf-8")
    assert "**no drift at alpha=0.01**" in text and "DRIFT" not in text
    assert "embedding drift: not applicable" in text and not (tmp_path / "embedding.png").exists()
    assert all((tmp_path / link).is_file() for link in linked_files(text))
    with Image.open(tmp_path / "classes.png") as picture:
        width, height = picture.size
        assert width > 1000 and height > 700  # 100 pairs of bars on two rows of 50
