"""Prepared data on disk: one `.npz` per split (uint8 images, int64 labels; no pickle) plus meta.json.

The `.npz` is written uncompressed, so its images can also be memory-mapped in place (`load_split(...,
mmap=True)`): a split larger than memory is then paged in by the OS as batches need it. It is also written
in chunks (`save_split`), so writing a split never needs a second copy of its pixels in memory."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.errors import DataError


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, C, H, W); a read-only np.memmap when loaded with mmap=True
    labels: np.ndarray  # int64 (N,)
    source: Path | None = None  # the file the images are mapped from (mmap=True)


CHUNK_BYTES = 64 << 20  # pixels gathered and written per chunk


def rows_per_chunk(images: np.ndarray, budget: int) -> int:
    """How many of `images` (N, ...) fit in `budget` values (bytes, for uint8): at least one. Every pass
    over a whole split (writing, statistics, hashing, augmenting) goes in chunks of this many rows."""
    return max(1, budget // max(1, int(np.prod(images.shape[1:]))))


def save_split(path: Path, split: Split, index: np.ndarray | None = None) -> None:
    """Write `split` (or the samples `index` picks from it, in that order) as an uncompressed `.npz` that
    `np.load` reads like `np.savez`'s. The images go out `CHUNK_BYTES` at a time: only one chunk of the
    selection is ever copied, whatever the size of the split (or of the memory map it comes from)."""
    images = split.images
    rows = np.arange(len(split.labels)) if index is None else np.asarray(index)
    per_chunk = rows_per_chunk(images, CHUNK_BYTES)
    chunks = (images[rows[start : start + per_chunk]] for start in range(0, len(rows), per_chunk))
    write_split(path, (len(rows), *images.shape[1:]), chunks, np.asarray(split.labels)[rows])


def write_split(path: Path, shape: tuple[int, ...], chunks: Iterable[np.ndarray], labels: np.ndarray) -> None:
    """Write a split whose images (`shape`, uint8) arrive as consecutive chunks along the first axis."""
    try:
        _write_split(path, shape, chunks, labels)
    except OSError as exc:
        if exc.filename is None:  # a failed write (a full disk: ENOSPC) names no file; say which one it was
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _write_split(path: Path, shape: tuple[int, ...], chunks: Iterable[np.ndarray], labels: np.ndarray) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    written = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                if chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{path}: a chunk of shape {chunk.shape} in images of shape {shape}")
                fh.write(chunk.data.cast("B"))
                written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"{path}: {written} images written, {shape[0]} announced")
        with zf.open("labels.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.asarray(labels).astype(np.int64), allow_pickle=False)


def load_split(path: Path, mmap: bool = False, meta: dict[str, Any] | None = None) -> Split:
    """Read a split; with `mmap` the images stay on disk as a read-only memory map (labels are read).
    The split is checked (uint8 (N, C, H, W) images, one integer label each) and, against `meta` (by default the
    meta.json beside it, when there is one), for labels in [0, num_classes) and the prepared image shape: a bad
    file is one DataError naming it and the problem, not a traceback from deep in training."""
    if not path.is_file():
        raise DataError(f"{path}: missing (run the stage that writes it first, or `dvc repro`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = npz["labels"]
            split = Split(map_npz_member(path, "images"), labels, source=path) if mmap else Split(npz["images"], labels)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a cnnpipe split file ({exc})") from None
    if meta is None and (path.parent / "meta.json").is_file():
        meta = load_meta(path.parent)
    check_split(path, split, meta)
    return split


def check_split(path: Path, split: Split, meta: dict[str, Any] | None = None) -> None:
    """One DataError naming `path` when its arrays cannot be a split of the data `meta` describes."""
    images, labels = split.images, split.labels
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{path}: images are {images.dtype} of shape {list(images.shape)}; expected uint8 (N, C, H, W)")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise DataError(
            f"{path}: labels are {labels.dtype} of shape {list(labels.shape)}; expected {len(images)} integers, "
            "one per image"
        )
    meta = meta or {}
    n_classes = int(meta["num_classes"]) if "num_classes" in meta else None
    if len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise DataError(f"{path}: label {lo} out of range (class indices are >= 0); re-run `dvc repro`")
        if n_classes is not None and hi >= n_classes:
            raise DataError(
                f"{path}: label {hi} out of range [0, {n_classes}) for the {n_classes} classes in meta.json; "
                "re-run `dvc repro`"
            )
    if "image_shape" in meta and list(images.shape[1:]) != [int(d) for d in meta["image_shape"]]:
        raise DataError(
            f"{path}: images of shape {list(images.shape[1:])} do not match image_shape {list(meta['image_shape'])} "
            "in the prepared data's meta.json (prepared with other settings?); re-run `dvc repro`"
        )


def map_npz_member(path: Path, name: str) -> np.ndarray:
    """Memory-map array `name` of an uncompressed `.npz`: the member is a plain `.npy` file stored at
    some offset in the zip, so numpy can map its data where it lies. numpy's own `np.load(mmap_mode=)`
    ignores `.npz` files."""
    with zipfile.ZipFile(path) as zf:
        member = zf.getinfo(f"{name}.npy")
    if member.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed and cannot be memory-mapped")
    with open(path, "rb") as fh:
        fh.seek(member.header_offset)
        local = fh.read(30)  # the local file header: its name and extra field lengths can differ from the index
        if local[:4] != b"PK\x03\x04":
            raise ValueError("bad zip member header")
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        fh.seek(member.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"{name}: .npy format {version} not supported for memory-mapping")
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{name} holds Python objects")
    if not shape or np.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)  # np.memmap refuses empty arrays
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


# meta.json keys the stages read (train, sweep: all of them, for the model spec; evaluate: via load_split).
META_KEYS = ("classes", "num_classes", "image_shape", "mean", "std")


def load_meta(folder: Path, required: tuple[str, ...] = META_KEYS) -> dict[str, Any]:
    """The prepared data's meta.json, checked: every `required` key present and of the right form
    (one DataError naming the file and the key otherwise)."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run `dvc repro prepare` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a cnnpipe meta file (a JSON object expected); re-run `dvc repro prepare`")
    missing = [k for k in required if k not in meta]
    if missing:
        raise DataError(f"{path}: no {', '.join(repr(k) for k in missing)} key; re-run `dvc repro prepare`")
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{path}: {problem}; re-run `dvc repro prepare`")
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the keys of `meta` that are there, if anything."""

    def whole(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    classes, shape = meta.get("classes"), meta.get("image_shape")
    if "classes" in meta and not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return f"'classes' must be a list of class names, got {classes!r:.80}"
    if "num_classes" in meta:
        n = meta["num_classes"]
        if not whole(n) or n < 1 or (isinstance(classes, list) and n != len(classes)):
            return f"'num_classes' must be the number of classes, got {n!r:.80}"
    if "image_shape" in meta and not (
        isinstance(shape, list) and len(shape) == 3 and all(whole(d) and d > 0 for d in shape)
    ):
        return f"'image_shape' must be [channels, height, width], got {shape!r:.80}"
    for key in ("mean", "std"):
        values = meta.get(key)
        if key in meta and not (
            isinstance(values, list)
            and all(number(v) for v in values)
            and (not isinstance(shape, list) or len(values) == shape[0])
        ):
            return f"{key!r} must be one number per channel, got {values!r:.80}"
    return None
