"""The checks prepare makes on the data it has split, written to meta.json's "checks": duplicates within and across
the splits (exact: the same stored pixels; near: perceptual hashes at most `data.near_duplicate_bits` apart),
optionally removed from val/test (`data.dedupe`); images per class and split and the train split's imbalance; the
source images' sizes and modes.

Duplicates are looked for in the stored pixels, not the files: every source has them (the bundled digits have no
files), byte-identical files decode identically, and a resized or re-encoded copy, once fitted to the stored size,
gets nearly the same perceptual hash (phash, as imagehash computes it: the signs against their median of the 8 x 8
lowest DCT frequencies of the image in grey at 32 x 32; see `phash_grey` for the one step done otherwise).
A val or test image that duplicates a train image measures memory, not generalisation.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnpipe.config import DataConfig
from cnnpipe.console import Progress
from cnnpipe.data.sources import RawData
from cnnpipe.data.split import SPLITS
from cnnpipe.errors import DataError

IMBALANCE_RATIO = 3.0  # warn when the largest train class has at least this many times the smallest's images
MAX_LISTED = 1000  # duplicate groups / pairs listed in meta.json (cross-split first); the counts are complete
MAX_GROUP_LISTED = 20  # members listed of one group of identical images (a folder of 5,000 blank images: one group)
PAIR_BLOCK_VALUES = 1 << 20  # hash pairs compared per block: 8 MB of XORs, whatever the number of images
# phash looks at an image as 32 x 32 grey: an image stored smaller, or from a smaller source, is an upscale there,
# and distinct small images come out within a few bits of each other (measured: 93 pairs of distinct 8 x 8 digits
# at <= 4 bits, 3,033 of mnist5k's 28 x 28 digits, 105 of them of different classes; none of those are copies).
# Near duplicates are not looked for when the stored side or the sources' median short side is below this.
MIN_NEAR_SIZE = 32
HASH_SIDE = 8  # phash: 8 x 8 DCT coefficients, 64 bits
PHASH_SIDE = 32  # ... of the image at 32 x 32 (imagehash's hash_size 8 x highfreq_factor 4)
HASH_BATCH = 1024  # images whose DCTs are computed at once (8 MB of float64)
SPLIT_PAIRS = [(a, b) for i, a in enumerate(SPLITS) for b in SPLITS[i:]]  # (train, train), (train, val), ...


def pair_name(a: str, b: str) -> str:
    return a if a == b else f"{a}-{b}"


def phash_grey(image: np.ndarray) -> np.ndarray:
    """What phash looks at of one stored uint8 (C, H, W) image: uint8 (32, 32), Pillow's grey (ITU-R 601 luma, as
    imagehash converts) reduced by area (BOX). imagehash resizes with LANCZOS instead: 250 of the 390 us an RGB image
    at 235 px costs it, against 45 for BOX, which put prepare's checks at 17 % of the rest of prepare on 20,000 photos
    (7 % now), while copies stay as near their originals (resized and JPEG-70 copies within 4 bits: 81 of 96 with BOX,
    84 with LANCZOS; 100 of 100 either way in bench/prepare_checks.py). An RGB image goes to Pillow by Image.merge
    of its planes (37 us), not fromarray of a transposed view (330 us: a strided copy)."""
    from PIL import Image

    pil = Image.fromarray(image[0]) if image.shape[0] == 1 else Image.merge("RGB", [Image.fromarray(c) for c in image])
    return np.asarray(pil.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.BOX))


def phash_of(grey: np.ndarray) -> np.ndarray:
    """imagehash.phash's own step on a batch of (N, 32, 32) grey images, vectorised (12 us an image, against its 60
    one at a time): the 8 x 8 lowest frequencies of the 2-D DCT (scipy.fftpack, as imagehash), each bit whether a
    coefficient is above their median. uint64 (N,): each hash's hex string read as an integer, bit for bit
    imagehash's (tests/test_data_checks.py compares them)."""
    import scipy.fftpack

    dct = scipy.fftpack.dct(scipy.fftpack.dct(grey, axis=1), axis=2)[:, :HASH_SIDE, :HASH_SIDE].reshape(len(grey), -1)
    above = dct > np.median(dct, axis=1, keepdims=True)
    return np.packbits(above, axis=1).view(">u8").ravel().astype(np.uint64)


def perceptual_hashes(images: np.ndarray, rows: np.ndarray, stage: str = "prepare") -> np.ndarray:
    """uint64 perceptual hash (phash) of each of `images[rows]`, in batches of HASH_BATCH."""
    out = np.empty(len(rows), dtype=np.uint64)
    progress = Progress(stage, "hashed", len(rows))
    for start in range(0, len(rows), HASH_BATCH):
        batch = rows[start : start + HASH_BATCH]
        out[start : start + len(batch)] = phash_of(np.stack([phash_grey(images[row]) for row in batch]))
        progress.update(start + len(batch))
    return out


def content_ids(images: np.ndarray, rows: np.ndarray, phashes: np.ndarray | None = None) -> np.ndarray:
    """For each of `rows`, the position (in `rows`) of the first image with the same stored pixels (sha256).
    Identical pixels have identical phashes, so with `phashes` only the images whose phash is shared are hashed in
    full: on a folder of distinct photos that is almost none of the 3.3 GB 20,000 images at 235 px hold (sha256
    of all of them: 1.9 s). Without (small images, no near check), every image is hashed: cheap at that size."""
    ids = np.arange(len(rows))
    candidates = ids
    if phashes is not None:
        _, inverse, counts = np.unique(phashes, return_inverse=True, return_counts=True)
        candidates = np.flatnonzero(counts[inverse] > 1)
    first: dict[bytes, int] = {}
    for k in candidates:
        digest = hashlib.sha256(np.ascontiguousarray(images[rows[k]]).data).digest()
        ids[k] = first.setdefault(digest, int(k))
    return ids


@dataclass
class Found:
    """Duplicates among the images of all splits, laid end to end (train, then val, then test): positions."""

    exact_groups: list[np.ndarray]  # positions of each set of identical images (2 or more)
    near_pairs: dict[str, int]  # near pairs (not exact) per split pair name
    near_listed: list[tuple[int, int, int]]  # (position, position, bits), cross-split first, at most MAX_LISTED
    exact_later: np.ndarray  # bool per position: identical to an image of an earlier split
    near_later: np.ndarray  # bool per position: near an image of an earlier split
    seconds: dict[str, float] = field(default_factory=dict)


def find_duplicates(
    images: np.ndarray, splits: dict[str, np.ndarray], near_bits: int | None, stage: str = "prepare"
) -> Found:
    """Exact and (unless `near_bits` is None) near duplicates among `images[splits[s]]` for every split s."""
    rows = np.concatenate([splits[s] for s in SPLITS])
    bounds = np.cumsum([0, *(len(splits[s]) for s in SPLITS)])
    n = len(rows)
    side = np.repeat(np.arange(len(SPLITS)), np.diff(bounds))
    t0 = time.perf_counter()
    phashes = perceptual_hashes(images, rows, stage) if near_bits is not None else None
    t1 = time.perf_counter()
    ids = content_ids(images, rows, phashes)
    t2 = time.perf_counter()
    by_id = np.argsort(ids, kind="stable")
    _, starts, sizes = np.unique(ids[by_id], return_index=True, return_counts=True)
    groups = [by_id[a : a + k] for a, k in zip(starts, sizes, strict=True) if k > 1]
    exact_later = np.zeros(n, dtype=bool)
    for g in groups:
        exact_later[g[side[g] > side[g].min()]] = True
    near_later = np.zeros(n, dtype=bool)
    counts = {pair_name(a, b): 0 for a, b in SPLIT_PAIRS}
    cross: list[tuple[int, int, int]] = []
    within: list[tuple[int, int, int]] = []
    if phashes is not None and near_bits is not None:
        block = max(1, PAIR_BLOCK_VALUES // max(1, n))
        for s in range(len(SPLITS)):
            for r0 in range(int(bounds[s]), int(bounds[s + 1]), block):
                r1 = min(r0 + block, int(bounds[s + 1]))
                bits = np.bitwise_count(phashes[r0:r1, None] ^ phashes[None, r0:])
                near = bits <= near_bits
                near[:, : r1 - r0] &= np.triu(np.ones((r1 - r0, r1 - r0), dtype=bool), 1)  # each pair once
                # Near pairs are few (a handful among millions): the rest works on their indices, not the block.
                ii, jj = np.nonzero(near)
                i, j = r0 + ii, r0 + jj
                keep = ids[i] != ids[j]  # identical images are exact duplicates, not near ones
                i, j, d = i[keep], j[keep], bits[ii[keep], jj[keep]]
                for t, count in enumerate(np.bincount(side[j], minlength=len(SPLITS))[s:], start=s):
                    counts[pair_name(SPLITS[s], SPLITS[t])] += int(count)
                near_later[j[side[j] > s]] = True
                across = side[j] != s
                for pick, listed in ((across, cross), (~across, within)):
                    room = MAX_LISTED - len(listed)
                    listed.extend(
                        zip(i[pick][:room].tolist(), j[pick][:room].tolist(), d[pick][:room].tolist(), strict=True)
                    )
    t3 = time.perf_counter()
    seconds = {"phash_s": t1 - t0, "exact_s": t2 - t1, "near_pairs_s": t3 - t2}
    return Found(groups, counts, (cross + within)[:MAX_LISTED], exact_later, near_later, seconds)


def hashed_side(raw: RawData) -> int:
    """The side of the detail phash can see: the stored side, or the sources' median short side when smaller."""
    side = int(min(raw.images.shape[-2:]))
    if raw.sizes is not None and len(raw.sizes):
        side = min(side, int(np.median(raw.sizes.min(axis=1))))
    return side


@dataclass
class Checked:
    """What `run_checks` gives the stage: the splits to write (after `data.dedupe`) and meta.json's "checks"."""

    splits: dict[str, np.ndarray]
    section: dict[str, Any]
    seconds: dict[str, float]  # where the time went (for bench/prepare_checks.py; not written anywhere)


def run_checks(raw: RawData, splits: dict[str, np.ndarray], data: DataConfig, stage: str = "prepare") -> Checked:
    """Duplicates (and their removal from val/test per `data.dedupe`), class counts, imbalance, source summary.
    A removal that would leave a class without images in a split is one DataError naming both."""
    start = time.perf_counter()
    side_len = hashed_side(raw)
    near_bits = data.near_duplicate_bits if side_len >= MIN_NEAR_SIZE else None
    if near_bits is None and data.dedupe == "near":  # set explicitly: used, or refused, never quietly weakened
        raise DataError(
            f"data.dedupe=near: images of {side_len} px are below the {MIN_NEAR_SIZE} px a perceptual hash needs "
            "to tell distinct images apart; set data.dedupe=exact (identical images) or none"
        )
    found = find_duplicates(raw.images, splits, near_bits, stage)
    rows = np.concatenate([splits[s] for s in SPLITS])
    bounds = np.cumsum([0, *(len(splits[s]) for s in SPLITS)])
    side = np.repeat(np.arange(len(SPLITS)), np.diff(bounds))
    drop = np.zeros(len(rows), dtype=bool)
    if data.dedupe in ("exact", "near"):
        drop |= found.exact_later
    if data.dedupe == "near":
        drop |= found.near_later
    kept = {s: splits[s][~drop[bounds[k] : bounds[k + 1]]] for k, s in enumerate(SPLITS)}
    _check_classes_left(raw, splits, kept, data)
    # Each position's index in the split as written (after removal), -1 for a removed image.
    written = np.full(len(rows), -1)
    for k in range(len(SPLITS)):
        keep = ~drop[bounds[k] : bounds[k + 1]]
        written[bounds[k] : bounds[k + 1]][keep] = np.arange(int(keep.sum()))

    def member(pos: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "split": SPLITS[side[pos]],
            "index": int(written[pos]) if written[pos] >= 0 else None,
            "source_index": int(rows[pos]),
            "file": raw.files[rows[pos]] if raw.files is not None else None,
        }
        if written[pos] < 0:
            out["removed"] = True
        return out

    exact_counts = {pair_name(a, b): 0 for a, b in SPLIT_PAIRS}
    for g in found.exact_groups:
        per = np.bincount(side[g], minlength=len(SPLITS))
        for a, b in SPLIT_PAIRS:
            i, j = SPLITS.index(a), SPLITS.index(b)
            exact_counts[pair_name(a, b)] += int(per[i] * (per[i] - 1) // 2 if i == j else per[i] * per[j])
    # Identical images filed under different classes: a labelling error, whatever the splits (listed first).
    conflicting = [len(set(raw.labels[rows[g]].tolist())) > 1 for g in found.exact_groups]
    order = sorted(
        range(len(found.exact_groups)),
        key=lambda k: (not conflicting[k], len(set(side[found.exact_groups[k]].tolist())) == 1),  # then cross-split
    )

    def group(k: int) -> dict[str, Any]:
        g = found.exact_groups[k]
        shown = sorted(g, key=lambda p: (-int(side[p]), int(p)))[:MAX_GROUP_LISTED]  # test, val members before train
        classes = sorted({raw.classes[c] for c in raw.labels[rows[g]].tolist()})
        return {"size": len(g), "classes": classes, "members": [member(int(p)) for p in shown]}

    exact = {
        "pairs": exact_counts,
        "groups_total": len(found.exact_groups),
        "conflicting_classes_total": sum(conflicting),
        "groups": [group(k) for k in order[:MAX_LISTED]],
    }
    near: dict[str, Any] = {"bits": data.near_duplicate_bits, "checked": near_bits is not None}
    if near_bits is None:
        near["skipped"] = (
            f"images of {side_len} px, below the {MIN_NEAR_SIZE} x {MIN_NEAR_SIZE} phash looks at: distinct images "
            "come out within a few bits of each other"
        )
    near["pairs"] = found.near_pairs
    near["pairs_total"] = sum(found.near_pairs.values())
    near["listed"] = [{"a": member(i), "b": member(j), "bits": b} for i, j, b in found.near_listed]
    removed = [member(int(p)) for p in np.flatnonzero(drop)[:MAX_LISTED]]
    section = {
        "duplicates": {"exact": exact, "near": near},
        "removed": {
            "dedupe": data.dedupe,
            "counts": {s: int(drop[bounds[k] : bounds[k + 1]].sum()) for k, s in enumerate(SPLITS)},
            "images": removed,
        },
        "class_counts": {
            s: dict(
                zip(raw.classes, np.bincount(raw.labels[kept[s]], minlength=len(raw.classes)).tolist(), strict=True)
            )
            for s in SPLITS
        },
        "imbalance": imbalance(raw, kept["train"]),
        "source": source_summary(raw),
    }
    seconds = {**found.seconds, "checks_s": time.perf_counter() - start}
    return Checked(kept, section, seconds)


def _check_classes_left(
    raw: RawData, before: dict[str, np.ndarray], after: dict[str, np.ndarray], data: DataConfig
) -> None:
    """One DataError when the removal left a class without images in val or test."""
    for s in SPLITS[1:]:
        left = np.bincount(raw.labels[after[s]], minlength=len(raw.classes))
        had = np.bincount(raw.labels[before[s]], minlength=len(raw.classes))
        for c in np.flatnonzero(left == 0):
            fixes = "data.dedupe=none" + (
                " or exact, or a lower data.near_duplicate_bits" if data.dedupe == "near" else ""
            )
            raise DataError(
                f"data.dedupe={data.dedupe} would remove all {had[c]} {s} image(s) of class '{raw.classes[c]}' (each "
                f"duplicates an image of an earlier split) and leave it none; set {fixes}, or fix the source"
            )


def imbalance(raw: RawData, train: np.ndarray) -> dict[str, Any]:
    """The largest and smallest train class and their ratio."""
    counts = np.bincount(raw.labels[train], minlength=len(raw.classes))
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    return {
        "largest": {"class": raw.classes[big], "count": int(counts[big])},
        "smallest": {"class": raw.classes[small], "count": int(counts[small])},
        "ratio": round(float(counts[big]) / max(1, int(counts[small])), 3),
        "warn_at": IMBALANCE_RATIO,
    }


def source_summary(raw: RawData) -> dict[str, Any] | None:
    """Sizes (width, height: min, median, max; distinct sizes) and Pillow modes of the source images."""
    if raw.sizes is None or raw.modes is None or not len(raw.sizes):
        return None

    def spread(values: np.ndarray) -> dict[str, float]:
        median = float(np.median(values))
        return {
            "min": int(values.min()),
            "median": int(median) if median.is_integer() else median,
            "max": int(values.max()),
        }

    return {
        "kind": "files" if raw.files is not None else "bundled",
        "images": len(raw.sizes),
        "width": spread(raw.sizes[:, 0]),
        "height": spread(raw.sizes[:, 1]),
        "distinct_sizes": len(np.unique(raw.sizes, axis=0)),
        "modes": dict(Counter(raw.modes).most_common()),
    }


def duplicate_lines(section: dict[str, Any], meta_path: str) -> tuple[list[str], list[str]]:
    """Warnings (cross-split duplicates; identical images under different classes) and info lines (duplicates
    within a split; near duplicates not looked for)."""
    dup, removed = section["duplicates"], section["removed"]
    cross: list[tuple[str, int]] = []
    within: list[tuple[str, int]] = []
    for kind in ("exact", "near"):
        for pair, count in dup[kind]["pairs"].items():
            if count:
                (cross if "-" in pair else within).append((f"{kind} {pair}", count))
    warnings = []
    if cross:
        if removed["dedupe"] == "none":
            then = "data.dedupe=exact|near drops them from val/test"
        else:
            gone = ", ".join(f"{s} {c}" for s, c in removed["counts"].items() if c) or "none"
            then = f"data.dedupe={removed['dedupe']} removed {gone} image(s)"
            if removed["dedupe"] == "exact" and any(k.startswith("near") for k, _ in cross):
                then += "; data.dedupe=near drops the near ones too"
        warnings.append(
            f"{sum(c for _, c in cross)} cross-split duplicate pair(s) ({', '.join(f'{k} {c}' for k, c in cross)}); "
            f"listed in {meta_path} checks.duplicates; {then}"
        )
    exact = dup["exact"]
    if exact["conflicting_classes_total"]:
        warnings.append(
            f"{exact['conflicting_classes_total']} group(s) of identical images are filed under different classes "
            f"(a labelling error); listed first in {meta_path} checks.duplicates.exact.groups with their classes"
        )
    notes = []
    if within:
        shown = ", ".join(f"{k} {c}" for k, c in within)
        notes.append(f"duplicate pairs within a split (kept): {shown}; listed in {meta_path} checks.duplicates")
    if not dup["near"]["checked"]:
        notes.append(f"near duplicates not looked for: {dup['near']['skipped']} (exact ones are)")
    return warnings, notes


def imbalance_line(section: dict[str, Any]) -> str | None:
    imb = section["imbalance"]
    if imb["ratio"] < IMBALANCE_RATIO:
        return None
    big, small = imb["largest"], imb["smallest"]
    return (
        f"class imbalance: train has {big['count']} '{big['class']}' images but {small['count']} '{small['class']}' "
        f"({imb['ratio']:g}x); train.class_balance=loss or sampler weights the classes"
    )


def source_line(section: dict[str, Any]) -> str | None:
    """One line about the source files' sizes and modes (bundled data: nothing to say)."""
    src = section["source"]
    if not src or src["kind"] != "files":
        return None
    w, h = src["width"], src["height"]
    modes = ", ".join(f"{m} {c}" for m, c in src["modes"].items())
    return (
        f"source images: {src['images']}, width {w['min']}..{w['max']} (median {w['median']}), height "
        f"{h['min']}..{h['max']} (median {h['median']}), {src['distinct_sizes']} distinct size(s); modes {modes}"
    )
