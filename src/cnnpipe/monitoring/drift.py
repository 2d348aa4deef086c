"""Drift of a served model's inputs and outputs: a window of its prediction log against its reference.

The tests are those of Rabanser et al. 2019, "Failing Loudly" (and of alibi-detect's KSDrift/ChiSquareDrift,
which cannot be installed beside this stack): a two-sample Kolmogorov-Smirnov test for each input statistic,
each embedding component and the confidence; a chi-squared test of the 2 x C table of predicted-class counts.
One threshold for all of them: Bonferroni over the tests run, so a window drawn from the reference's
distribution raises a false alarm with probability at most `alpha`. On top, a rule for image sizes: images of
the training distribution lie inside the training images' size range by construction, so more than
`size_share` of the window outside it is drift, whatever any test says.

Pure: numpy and scipy in, a DriftResult out; no files, no tracking, no model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from cnnpipe.errors import ConfigError, DataError

__all__ = [
    "EMBEDDING",
    "FAMILIES",
    "INPUTS",
    "MIN_EXPECTED",
    "MIN_WINDOW",
    "DriftResult",
    "DriftTest",
    "Sample",
    "detect_drift",
]

Sample = Mapping[str, Any]  # name -> np.ndarray; "embedding", "size_min", "size_max" may be absent
MIN_WINDOW = 30  # images, in the window and in the reference: fewer give tests without power
MIN_EXPECTED = 5.0  # expected count per cell below which classes are pooled (Cochran's rule for chi-squared)
FAMILIES = ("size", "input", "embedding", "classes", "confidence")
INPUTS = ("brightness", "contrast")
EMBEDDING = "embedding"
_REQUIRED = ("brightness", "contrast", "width", "height", "confidence", "predicted")
KS = "two-sample Kolmogorov-Smirnov"
CHI2 = "chi-squared (2 x C contingency)"
SIZE_RULE = "share outside training range"


@dataclass(frozen=True)
class DriftTest:
    """One test or rule on one quantity. `threshold`: what `p_value` must fall below (tests) or `statistic`
    must not exceed (the size rule, whose `p_value` is None). `detail`: one line for a person."""

    family: str
    name: str
    method: str
    statistic: float
    p_value: float | None
    threshold: float
    drift: bool
    detail: str


@dataclass(frozen=True)
class DriftResult:
    """Every test run on one window, in FAMILIES order. `alpha`: the family-wise false-alarm rate the tests'
    common threshold holds; `window`, `reference`: their image counts; `not_applicable`: one line per family
    that could not be tested, saying why."""

    tests: tuple[DriftTest, ...]
    alpha: float
    size_share: float
    window: int
    reference: int
    not_applicable: tuple[str, ...]

    @property
    def drift(self) -> bool:
        return any(t.drift for t in self.tests)

    @property
    def families(self) -> dict[str, bool]:
        """Each family tested, in FAMILIES order: whether any of its tests drifted."""
        return {f: any(t.drift for t in self.tests if t.family == f) for f in FAMILIES if self.tested(f)}

    @property
    def drifted(self) -> list[str]:
        return [f for f, d in self.families.items() if d]

    @property
    def n_tests(self) -> int:
        """The statistical tests run (the size rule is not one): the Bonferroni divisor."""
        return sum(t.p_value is not None for t in self.tests)

    @property
    def threshold(self) -> float:
        """The p-value each test must fall below to drift: alpha / n_tests."""
        return self.alpha / max(self.n_tests, 1)

    @property
    def verdict(self) -> str:
        """One line: `DRIFT: <families>` or `no drift at alpha=...`, with the thresholds that decided it."""
        how = (
            f"{self.n_tests} tests, each drifting at p < alpha/{self.n_tests} = {self.threshold:.3g}; "
            f"size rule: at most {self.size_share:.1%} of the window outside the training range"
        )
        if self.drift:
            return f"DRIFT: {', '.join(self.drifted)} (alpha={self.alpha:g}: {how})"
        return f"no drift at alpha={self.alpha:g} ({how})"

    def tested(self, family: str) -> bool:
        return any(t.family == family for t in self.tests)

    def test(self, family: str, name: str) -> DriftTest | None:
        return next((t for t in self.tests if t.family == family and t.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the verdict, the families, the thresholds and every test."""
        return {
            "drift": self.drift,
            "verdict": self.verdict,
            "families": self.families,
            "alpha": self.alpha,
            "threshold": self.threshold,
            "size_share": self.size_share,
            "window": self.window,
            "reference": self.reference,
            "not_applicable": list(self.not_applicable),
            "tests": [asdict(t) for t in self.tests],
        }


def detect_drift(
    reference: Sample,
    window: Sample,
    n_classes: int,
    alpha: float = 0.01,
    size_share: float = 0.01,
    class_names: Sequence[str] | None = None,
) -> DriftResult:
    """Compare `window` with `reference`. `class_names` (optional, `n_classes` long) names classes in details.
    Raises DataError for a sample that cannot be tested (too small, malformed, mismatched embeddings)."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha!r}: the false-alarm rate must lie strictly between 0 and 1")
    if not 0 <= size_share < 1:
        raise ConfigError(f"size_share={size_share!r}: the share of images allowed outside must lie in [0, 1)")
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class names for {n_classes} classes")
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    ref = _checked(reference, "reference", n_classes)
    win = _checked(window, "window", n_classes)
    ref_emb, win_emb, not_applicable = _embeddings(ref, win)

    pairs = [("input", name, ref[name], win[name]) for name in INPUTS]
    if ref_emb is not None and win_emb is not None:
        pairs += [("embedding", f"pc{j + 1}", ref_emb[:, j], win_emb[:, j]) for j in range(ref_emb.shape[1])]
    pairs.append(("confidence", "confidence", ref["confidence"], win["confidence"]))
    threshold = alpha / (len(pairs) + 1)  # Bonferroni: the KS tests and the classes test
    tests = [_size_rule(ref, win, size_share), _classes(ref["predicted"], win["predicted"], names, threshold)]
    tests += [_ks(family, name, r, w, threshold) for family, name, r, w in pairs]
    tests.sort(key=lambda t: FAMILIES.index(t.family))  # stable: components stay in order
    return DriftResult(
        tests=tuple(tests),
        alpha=float(alpha),
        size_share=float(size_share),
        window=len(win["predicted"]),
        reference=len(ref["predicted"]),
        not_applicable=tuple(not_applicable),
    )


# --- the samples -------------------------------------------------------------------------------------------


def _checked(sample: Sample, role: str, n_classes: int) -> dict[str, np.ndarray]:
    """The sample's arrays as numpy (float64; ints for sizes and classes), or DataError naming role and key.
    A reference that states its training size range (size_min, size_max) needs no per-image width and height."""
    out = _size_range(sample, role)
    sizes_optional = role == "reference" and "size_min" in out and "size_max" in out
    required = [k for k in _REQUIRED if not (sizes_optional and k in ("width", "height"))]
    missing = [k for k in required if sample.get(k) is None]
    if missing:
        raise DataError(f"the {role} has no {', '.join(repr(k) for k in missing)}: drift tests need {list(_REQUIRED)}")
    present = [k for k in _REQUIRED if sample.get(k) is not None]
    arrays = {k: np.asarray(sample[k]) for k in present}
    n = len(arrays["predicted"]) if arrays["predicted"].ndim == 1 else -1
    for key, value in arrays.items():
        if value.ndim != 1 or len(value) != n:
            raise DataError(f"the {role}'s {key!r} has shape {value.shape}, not ({max(n, 0)},) like its 'predicted'")
    if n < MIN_WINDOW:
        raise DataError(f"the {role} holds {n} images; drift tests need at least {MIN_WINDOW}")
    for key, value in arrays.items():
        out[key] = _numbers(value, role, key, integral=key in ("width", "height", "predicted"))
    if any((out[k] < 1).any() for k in ("width", "height") if k in out):
        raise DataError(f"the {role} has image sizes below 1 pixel in 'width' or 'height'")
    bad = out["predicted"][(out["predicted"] < 0) | (out["predicted"] >= n_classes)]
    if len(bad):
        raise DataError(f"the {role}'s 'predicted' holds class {bad[0]}, outside the model's 0..{n_classes - 1}")
    if sample.get(EMBEDDING) is not None:
        emb = np.asarray(sample[EMBEDDING])
        if emb.ndim != 2 or len(emb) != n:
            raise DataError(f"the {role}'s 'embedding' has shape {emb.shape}, not ({n}, k)")
        out[EMBEDDING] = _numbers(emb, role, EMBEDDING, integral=False)
    return out


def _size_range(sample: Sample, role: str) -> dict[str, np.ndarray]:
    """size_min and size_max ([width, height]) where the sample states them, checked."""
    out = {}
    for key in ("size_min", "size_max"):
        if sample.get(key) is not None:
            value = np.asarray(sample[key])
            if value.shape != (2,):
                raise DataError(f"the {role}'s {key!r} has shape {value.shape}, not (2,) [width, height]")
            out[key] = _numbers(value, role, key, integral=True)
    if len(out) == 2 and (out["size_min"] > out["size_max"]).any():
        raise DataError(
            f"the {role}'s size_min {out['size_min'].tolist()} exceeds its size_max {out['size_max'].tolist()}"
        )
    return out


def _numbers(value: np.ndarray, role: str, key: str, integral: bool) -> np.ndarray:
    """`value` as finite float64 (or int64 when `integral`), or DataError naming the first bad value."""
    if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
        raise DataError(f"the {role}'s {key!r} holds {value.dtype} values, not numbers")
    as_float = value.astype(np.float64)
    bad = ~np.isfinite(as_float)
    if integral:
        bad |= as_float != np.round(as_float)
    if bad.any():
        kind = "whole numbers" if integral else "finite numbers"
        raise DataError(
            f"the {role}'s {key!r} holds {float(as_float[bad][0])!r} ({bad.sum()} such values); needs {kind}"
        )
    return as_float.astype(np.int64) if integral else as_float


def _embeddings(
    ref: dict[str, np.ndarray], win: dict[str, np.ndarray]
) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Both embeddings when both samples carry one of the same width; else a not-applicable line."""
    ref_emb, win_emb = ref.get(EMBEDDING), win.get(EMBEDDING)
    lacking = [role for role, e in (("reference", ref_emb), ("window", win_emb)) if e is None or e.shape[1] == 0]
    if lacking:
        who = " and the ".join(lacking) + (" carry" if len(lacking) == 2 else " carries")
        return None, None, [f"embedding drift: not applicable, the {who} no embedding"]
    assert ref_emb is not None and win_emb is not None
    if ref_emb.shape[1] != win_emb.shape[1]:
        raise DataError(
            f"the window's embedding has {win_emb.shape[1]} components, the reference's {ref_emb.shape[1]}: "
            "they must be projected on the same principal components"
        )
    return ref_emb, win_emb, []


# --- the tests ---------------------------------------------------------------------------------------------


def _ks(family: str, name: str, ref: np.ndarray, win: np.ndarray, threshold: float) -> DriftTest:
    """Two-sample KS. Ties (sizes, saturated confidences) make it conservative, never invalid; identical
    constants give D = 0, p = 1. scipy falls back from its exact p-value on some sizes with a warning: silenced,
    the asymptotic p-value it then returns is the documented alternative."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ee]xact calculation unsuccessful.*", category=RuntimeWarning)
        result = stats.ks_2samp(ref, win)
    statistic, p = float(result.statistic), float(result.pvalue)
    detail = f"window mean {_spread(win)} vs reference {_spread(ref)}"
    return DriftTest(family, name, KS, statistic, p, threshold, p < threshold, detail)


def _spread(values: np.ndarray) -> str:
    """`mean (sd ...)` to two significant digits of the sd: a mean of 1e-16 on a scale of 1 reads as 0.00."""
    mean, sd = float(values.mean()), float(values.std())
    if sd == 0 or not np.isfinite(sd):
        return f"{mean:.3g} (constant)"
    digits = max(0, 1 - int(np.floor(np.log10(sd))))
    return f"{round(mean, digits) + 0.0:.{digits}f} (sd {sd:.2g})"


def _classes(ref: np.ndarray, win: np.ndarray, names: list[str], threshold: float) -> DriftTest:
    """Chi-squared test of homogeneity on the predicted-class counts. Classes whose expected count is below
    MIN_EXPECTED are pooled into one column: with many classes and a small window the chi-squared p-value is
    otherwise far too small (measured: 18% false alarms at a nominal 0.1% with 100 classes, a window of 30)."""
    counts = np.stack([np.bincount(ref, minlength=len(names)), np.bincount(win, minlength=len(names))])
    shares = counts / counts.sum(axis=1, keepdims=True)
    moved = int(np.argmax(np.abs(shares[1] - shares[0])))
    detail = f"largest change: class {names[moved]}, window {shares[1, moved]:.1%} vs reference {shares[0, moved]:.1%}"
    table, pooled = _pool_rare(counts)
    if table.shape[1] < 2:  # one class in use, in both: the same distribution
        only = names[int(np.flatnonzero(counts.sum(axis=0))[0])]
        return DriftTest(
            "classes", "predicted class", CHI2, 0.0, 1.0, threshold, False, f"every prediction is class {only}"
        )
    result = stats.chi2_contingency(table)
    statistic, p = float(result.statistic), float(result.pvalue)
    if pooled:
        detail += f"; {pooled} classes with expected count < {MIN_EXPECTED:g} pooled"
    return DriftTest("classes", "predicted class", CHI2, statistic, p, threshold, p < threshold, detail)


def _pool_rare(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """The 2 x C table with unused classes dropped and the rarest pooled into one column until every column's
    smaller expected count reaches MIN_EXPECTED (at least two columns are kept: then the pool may fall short,
    and chi2_contingency's Yates correction for one degree of freedom keeps the test conservative).
    Returns the table and how many classes went into the pool (0: none pooled)."""
    totals = counts.sum(axis=0)
    used = counts[:, totals > 0]
    order = np.argsort(used.sum(axis=0), kind="stable")
    used = used[:, order]
    expected = used.sum(axis=0) * used.sum(axis=1).min() / used.sum()  # the smaller row's expected counts
    if used.shape[1] < 2 or expected[0] >= MIN_EXPECTED:
        return used, 0
    pooled_expected = np.cumsum(expected)
    # k: columns pooled; the pool (first k) and the column after it must both reach MIN_EXPECTED
    enough = (pooled_expected >= MIN_EXPECTED) & (np.append(expected[1:], np.inf) >= MIN_EXPECTED)
    k = int(np.argmax(enough)) + 1 if enough.any() else used.shape[1]
    k = min(k, used.shape[1] - 1)
    if k < 2:  # a pool of one column is that column: nothing to pool
        return used, 0
    table = np.column_stack([used[:, :k].sum(axis=1), used[:, k:]])
    return table, k


def _size_rule(ref: dict[str, np.ndarray], win: dict[str, np.ndarray], size_share: float) -> DriftTest:
    """The share of window images whose width or height lies outside the training images' range."""
    low = ref["size_min"] if "size_min" in ref else np.array([ref["width"].min(), ref["height"].min()])
    high = ref["size_max"] if "size_max" in ref else np.array([ref["width"].max(), ref["height"].max()])
    w, h = win["width"], win["height"]
    outside = (w < low[0]) | (w > high[0]) | (h < low[1]) | (h > high[1])
    share = float(outside.mean())
    detail = (
        f"{int(outside.sum())} of {len(w)} window images outside the training range "
        f"{_span(low[0], high[0])} x {_span(low[1], high[1])} px"
    )
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        detail += f", e.g. {w[first]}x{h[first]}"
    return DriftTest("size", "width x height", SIZE_RULE, share, None, size_share, share > size_share, detail)


def _span(low: int, high: int) -> str:
    return f"{low}" if low == high else f"{low}..{high}"
