"""What callers send -> the uint8 (N, C, H, W) batch the network was trained on.

Accepted, so the same model answers Python callers, `mlflow models serve` JSON and the predict command:
- pixel arrays, uint8 0..255: a batch (N, H, W), (N, H, W, C) or (N, C, H, W), or one image (H, W) — a 3-D
  array is always a gray batch; the channel axis of a 4-D one is the end of size 1-4;
- encoded image files (PNG, JPEG, ... anything Pillow reads) as bytes, or as base64 text (MLflow's JSON);
- a DataFrame / Series / dict holding one of those in a column `image` (or a frame's only column), one image a row.

Preprocessing is the training data's: encoded files go through `decode_image` (EXIF orientation, alpha over
black, 16-bit stretch, channels, bilinear resize), arrays through `fit_images` (as the digits / MNIST sources).
Scaling to [0, 1] is left to the predictor; the network normalises itself.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnpipe.data.images import ImageDecodeError, decode_image
from cnnpipe.data.sources import fit_images
from cnnpipe.errors import DataError

COLUMN = "image"  # the input column of DataFrames (MLflow's dataframe_split / dataframe_records JSON) and dicts
CHANNEL_COUNTS = (1, 2, 3, 4)  # gray, gray+alpha, RGB, RGBA


@dataclass
class ImageBatch:
    images: np.ndarray  # uint8 (N, C, H, W) at the model's in_shape; a row that failed is all zeros
    errors: list[str | None]  # per row: why it could not be used, or None


def to_batch(model_input: Any, in_shape: Sequence[int]) -> ImageBatch:
    """Normalise any accepted input to one batch at `in_shape` (C, H, W). Whole-input problems (a bad array
    shape or dtype) raise DataError; a single undecodable file only marks its row."""
    channels, size = int(in_shape[0]), int(in_shape[-1])
    cells = _cells(model_input)
    if isinstance(cells, np.ndarray):
        return ImageBatch(_fit_pixels(_batch_nchw(cells, in_shape), channels, size), [None] * len(cells))
    images = np.zeros((len(cells), channels, size, size), dtype=np.uint8)
    errors: list[str | None] = [None] * len(cells)
    for i, cell in enumerate(cells):
        try:
            images[i] = _one_image(cell, in_shape)
        except (ImageDecodeError, DataError) as exc:
            errors[i] = str(exc)
    return ImageBatch(images, errors)


def _cells(model_input: Any) -> np.ndarray | list[Any]:
    """A pixel batch (numeric ndarray) or a list with one image per item."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if COLUMN in model_input.columns:
            model_input = model_input[COLUMN]
        elif len(model_input.columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise DataError(f"expected a column {COLUMN!r}, got columns {list(model_input.columns)}")
    if isinstance(model_input, dict):
        if COLUMN not in model_input:
            raise DataError(f"expected the key {COLUMN!r}, got keys {sorted(model_input)}")
        model_input = model_input[COLUMN]
    if isinstance(model_input, pd.Series):
        model_input = model_input.tolist()
    if isinstance(model_input, (bytes, bytearray, memoryview, str)):
        return [model_input]
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "OSU":
        if model_input.ndim == 1 or model_input.dtype.kind in "SU":
            return list(model_input.reshape(-1))
        model_input = model_input.tolist()  # object array of numbers: JSON parsed against the signature
    if isinstance(model_input, (list, tuple)):
        if not model_input:
            raise DataError("no images in the input")
        if any(isinstance(c, (bytes, bytearray, memoryview, str)) for c in model_input):
            return list(model_input)  # encoded images (or a mix): each item on its own
        try:
            model_input = np.asarray(model_input)
        except ValueError:  # ragged: images of different sizes, one per item
            return list(model_input)
        if model_input.dtype == object:
            return list(model_input)
    if not isinstance(model_input, np.ndarray):
        raise DataError(f"unsupported input {type(model_input).__name__}: send pixel arrays or image bytes")
    if model_input.size == 0:
        raise DataError("no images in the input")
    return model_input


def _one_image(cell: Any, in_shape: Sequence[int]) -> np.ndarray:
    """One item: encoded bytes, base64 text, or the pixels of one image."""
    channels, size = int(in_shape[0]), int(in_shape[-1])
    if isinstance(cell, str):
        cell = _from_base64(cell)
    if isinstance(cell, (bytes, bytearray, memoryview)):
        try:
            return decode_image(io.BytesIO(bytes(cell)), channels, size)  # type: ignore[arg-type]  # a file object
        except ImageDecodeError as exc:  # Pillow names the file object: "<_io.BytesIO object at 0x...>"
            raise ImageDecodeError(re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))) from None
    pixels = np.asarray(cell)
    if pixels.ndim == 2:
        pixels = pixels[None]
    elif pixels.ndim == 3:
        pixels = pixels if _channels_first(pixels.shape, in_shape) else pixels.transpose(2, 0, 1)
    else:
        raise DataError(f"one image must be (H, W), (H, W, C) or (C, H, W), got shape {pixels.shape}")
    return _fit_pixels(pixels[None], channels, size)[0]


def _from_base64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError("text input is not base64-encoded image bytes") from None


def _batch_nchw(pixels: np.ndarray, in_shape: Sequence[int]) -> np.ndarray:
    if pixels.ndim == 2:  # one (H, W) image
        return pixels[None, None]
    if pixels.ndim == 3:  # (N, H, W) gray
        return pixels[:, None]
    if pixels.ndim == 4:
        return pixels if _channels_first(pixels.shape[1:], in_shape) else pixels.transpose(0, 3, 1, 2)
    raise DataError(f"pixel arrays must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {pixels.shape}")


def _channels_first(shape: Sequence[int], in_shape: Sequence[int]) -> bool:
    """Which axis of one (a, b, c) image holds the channels: the one of size 1-4; the model's own
    (C, H, W) shape counts as channels-first; when both ends could be channels, channels-last wins."""
    if tuple(shape) == tuple(in_shape):
        return True
    first, last = shape[0] in CHANNEL_COUNTS, shape[-1] in CHANNEL_COUNTS
    if first or last:
        return first and not last
    raise DataError(f"images of shape {tuple(shape)} have no channel axis of size 1-4 (first or last)")


def _fit_pixels(pixels: np.ndarray, channels: int, size: int) -> np.ndarray:
    """uint8 (N, C, H, W) with any C in 1..4 -> the model's channels and size; alpha composited over black."""
    x = _as_uint8(pixels)
    if x.shape[1] not in CHANNEL_COUNTS:
        raise DataError(f"images have {x.shape[1]} channels; expected 1 (gray), 2, 3 (RGB) or 4 (RGBA)")
    if x.shape[1] in (2, 4):  # gray+alpha / RGBA: over a black background, as decode_image does
        alpha = x[:, -1:].astype(np.float32) / 255.0
        x = np.rint(x[:, :-1].astype(np.float32) * alpha).astype(np.uint8)
    return fit_images(x, channels, size)


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    """Integers 0..255 (JSON numbers may arrive as int64 or whole floats); anything else is refused,
    floats in [0, 1] with a hint, since the model scales pixels itself."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind not in "iuf" and pixels.dtype != np.bool_:
        try:
            pixels = pixels.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"pixel values must be numbers 0..255, got dtype {pixels.dtype}") from None
    lo, hi = float(np.min(pixels)), float(np.max(pixels))
    whole = pixels.dtype.kind != "f" or bool(np.all(np.mod(pixels, 1) == 0))
    if not (whole and lo >= 0 and hi <= 255):
        hint = " (scaled to [0, 1]? send the 0..255 values: the model scales them itself)" if hi <= 1 else ""
        raise DataError(f"pixel values must be integers 0..255 (uint8), got {pixels.dtype} in [{lo}, {hi}]{hint}")
    return pixels.astype(np.uint8)
