"""monitor_drift: how often the monitor alarms on images like the training data, and how often it catches shifts.

The model: the project's own digits model (`models/`, with its training reference, as `make run` leaves it). The
images: the test split (never seen in training nor in the reference, which is the validation split), as served
through the predictor exactly as a prediction log records them, and shifted copies of it made here:
inverted (255 - x), blurred (Gaussian, sigma 1 px; also 0.5 px), brighter (+40 of 255, clipped), noisy (Gaussian,
sd 20 of 255), images that are no digit (8x8 patches of scikit-learn's two sample photographs), and one class only
(the 3s). For each set and window size, `--windows` windows are drawn at random from the set's records (without
replacement within a window) and given to `monitoring.drift.detect_drift` at alpha 0.01, as pipelines/monitor.py
does. Reported: the share of windows that alarm; for the same-distribution set that is the false-alarm rate
(goal: <= alpha + a margin for the test's dependence between overlapping windows, 0.02), for the others the
detection rate, and which test families fired.

Run alone: python -m bench.monitor_drift [--quick] [--windows N] [--project DIR]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.timing import cli, pin_threads, result, write_result

NAME = "monitor_drift"
ALPHA = 0.01
SIZES = (50, 100, 200)
GOAL = 0.02  # false alarms per window, same distribution
LOOSER = (0.05, 0.1, 0.2)  # alphas the same-distribution windows are also tested at (windows of 100)


def not_digits(n: int, seed: int = 0) -> np.ndarray:
    """`n` grey 8x8 patches of scikit-learn's two sample photographs (a temple, a flower): images of no digit."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(p).convert("L")) for p in load_sample_images().images]
    out = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    for i in range(n):
        photo = photos[i % 2]
        side = int(rng.integers(24, 96))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        patch = Image.fromarray(photo[y : y + side, x : x + side]).resize((8, 8), Image.Resampling.BILINEAR)
        out[i, 0] = np.asarray(patch)
    return out


def shifted_sets(images: np.ndarray, labels: np.ndarray, mild: bool = False) -> dict[str, np.ndarray]:
    """The test images and their shifted copies (uint8 N x C x H x W); `mild`: the milder shifts too."""
    from scipy import ndimage

    def blur(sigma: float) -> np.ndarray:
        out = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, 0, sigma, sigma))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    sets = {
        "same distribution": images,
        "inverted": 255 - images,
        "blurred (sigma 1)": blur(1.0),
        "not digits (photo patches)": not_digits(len(images)),
        "one class only (3s)": images[labels == 3],
    }
    if mild:
        noise = np.random.default_rng(1).normal(0, 20, images.shape)
        sets |= {
            "blurred (sigma 0.5)": blur(0.5),
            "brighter (+40)": np.clip(images.astype(np.int16) + 40, 0, 255).astype(np.uint8),
            "noisy (sd 20)": np.clip(np.rint(images + noise), 0, 255).astype(np.uint8),
        }
    return sets


def alarm_rates(
    reference: Any, logged: list[dict[str, Any]], windows: int, size: int, seed: int = 0, alpha: float = ALPHA
) -> tuple[float, Counter[str]]:
    """The share of `windows` random windows of `size` records that alarm, and how often each family fired."""
    from cnnpipe.monitoring.drift import detect_drift
    from cnnpipe.serving.monitor import reference_sample, window_sample

    rng = np.random.default_rng(seed)
    size = min(size, len(logged))
    alarms, fired = 0, Counter[str]()
    ref = reference_sample(reference)
    for _ in range(windows):
        window = [logged[i] for i in rng.choice(len(logged), size=size, replace=False)]
        found = detect_drift(ref, window_sample(window, reference)[0], len(reference.classes), alpha=alpha)
        alarms += found.drift
        fired.update(f for f, d in found.families.items() if d)
    return alarms / windows, fired


def run(project: Path, windows: int, quick: bool) -> dict[str, Any]:
    from cnnpipe.data.store import load_split
    from cnnpipe.models.predictor import ImagePredictor
    from cnnpipe.monitoring.prediction_log import records

    predictor = ImagePredictor.from_folder(project / "models")
    if predictor.reference is None:
        raise SystemExit(f"{project / 'models'}: no training reference; run `make run` first")
    test = load_split(project / "data/prepared/test.npz")
    rates: dict[str, dict[str, Any]] = {}
    for name, images in shifted_sets(test.images, test.labels, mild=not quick).items():
        frame, seen = predictor.observe(images)
        logged = records(frame, seen, predictor.reference.info["model_run"])
        rates[name] = {"images": len(images)}
        for size in SIZES[:1] if quick else SIZES:
            rate, fired = alarm_rates(predictor.reference, logged, windows, size)
            rates[name][str(size)] = {"alarm_rate": rate, "families": dict(fired)}
        if name == "same distribution":  # is the test alive, or only conservative? the rate at looser alphas
            rates[name]["looser_alpha"] = {
                str(a): alarm_rates(predictor.reference, logged, windows, 100, alpha=a)[0] for a in LOOSER
            }
    false_alarm = max(rates["same distribution"][str(s)]["alarm_rate"] for s in (SIZES[:1] if quick else SIZES))
    strong = [n for n in rates if n != "same distribution" and not n.startswith(("blurred (sigma 0.5)", "brighter"))]
    strong = [n for n in strong if not n.startswith("noisy")]
    detected = min(rates[n][str(s)]["alarm_rate"] for n in strong for s in (SIZES[:1] if quick else SIZES))

    def shown(name: str) -> str:
        """Rates by window size; a set smaller than a size gives one window of all of it, said as such."""
        n = rates[name]["images"]
        parts = {}
        for s in SIZES[:1] if quick else SIZES:
            parts.setdefault(min(s, n), f"{rates[name][str(s)]['alarm_rate']:.0%} at {min(s, n)}")
        return ", ".join(parts.values()) + (f" (all {n} images: one window)" if n < max(SIZES) else "")

    return result(
        name=NAME,
        title="drift monitor: false alarms on unshifted images, detection of shifted ones",
        what=(
            f"digits model (models/), reference = its validation split ({predictor.reference.info['images']} img); "
            f"{windows} random windows of the test split ({len(test.labels)} img) per set and size "
            f"({', '.join(map(str, SIZES[:1] if quick else SIZES))}), alpha {ALPHA}"
        ),
        ours="; ".join(f"{n}: {shown(n)}" for n in rates if n != "same distribution"),
        baseline=f"same distribution (false alarms): {shown('same distribution')}",
        ratio=false_alarm,
        ratio_label="false-alarm rate per window (worst size)",
        goal_op="<=",
        goal=GOAL,
        threads=1,
        details={"windows": windows, "alpha": ALPHA, "sets": rates, "min_detection_rate_strong_shifts": detected},
        quick=quick,
    )


def _options(parser: Any) -> None:
    parser.add_argument("--windows", type=int, default=None, help="windows per set and size (default 200)")
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[1], help="project root")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    pin_threads(args.threads)
    windows = args.windows or (20 if args.quick else 200)
    write_result(run(args.project, windows, args.quick))


if __name__ == "__main__":
    main()
