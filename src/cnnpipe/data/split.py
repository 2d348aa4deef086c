"""Stratified, seeded train/val/test split.

Hand-written rather than sklearn's `train_test_split` twice: that one can leave a small class out of
a split entirely; here every class gets at least one sample in each split, or a clear error.
"""

from __future__ import annotations

import numpy as np

from cnnpipe.config import SplitConfig
from cnnpipe.errors import DataError

SPLITS = ("train", "val", "test")


def stratified_split(
    labels: np.ndarray, ratios: SplitConfig, seed: int, class_names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Indices per split; each class is shuffled and cut by the ratios (>= 1 sample per split)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n = len(idx)
        n_val = max(1, round(n * ratios.val))
        n_test = max(1, round(n * ratios.test))
        if n - n_val - n_test < 1:
            name = class_names[cls] if class_names else str(cls)
            raise DataError(f"class '{name}' has {n} usable images: too few to split into train/val/test (need 3)")
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {s: np.sort(np.concatenate(parts[s])) for s in SPLITS}
