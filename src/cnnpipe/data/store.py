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
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    written = 0
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                if chunk.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{path}: a chunk of shape {chunk.shape} in images of shape {shape}")
                fh.write(memoryview(chunk).cast("B"))
                written += len(chunk)
        if written != shape[0]:
            raise ValueError(f"{path}: {written} images written, {shape[0]} announced")
        with zf.open("labels.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, np.asarray(labels).astype(np.int64), allow_pickle=False)


def load_split(path: Path, mmap: bool = False) -> Split:
    """Read a split; with `mmap` the images stay on disk as a read-only memory map (labels are read)."""
    if not path.is_file():
        raise DataError(f"{path}: missing (run the stage that writes it first, or `dvc repro`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = npz["labels"]
            if mmap:
                return Split(map_npz_member(path, "images"), labels, source=path)
            return Split(npz["images"], labels)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a cnnpipe split file ({exc})") from None


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


def load_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run `dvc repro prepare` first)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
