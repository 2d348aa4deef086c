"""What callers send -> the uint8 (N, C, H, W) batch the network was trained on.

Accepted, so the same model answers Python callers, `mlflow models serve` JSON and the predict command:
- pixel arrays, uint8 0..255: a batch (N, H, W), (N, H, W, C) or (N, C, H, W), or one image (H, W) — a 3-D
  array is always a gray batch; the channel axis of a 4-D one is the end of size 1-4;
- encoded image files (PNG, JPEG, ... anything Pillow reads) as bytes, or as base64 text (MLflow's JSON);
- a DataFrame / Series / dict holding one of those in a column `image` (or a frame's only column), one image a row.

Preprocessing is the training data's (the model's spec says it): encoded files go through `decode_image` (EXIF
orientation, alpha over black, 16-bit stretch, channels, the central square resized with the model's interpolation),
arrays through `fit_images` (as the digits / MNIST sources). Scaling to [0, 1] is left to the predictor; the network
crops and normalises itself.

Decoding is bounded, since a few KB of PNG can announce a 9,400 x 9,400 image: each image's size is read from its
header before any pixel is decoded, and an image over `CNNPIPE_MAX_IMAGE_PIXELS` (default 40 M pixels, e.g. 7,300 x
5,500), or one that would take the request past `CNNPIPE_MAX_REQUEST_PIXELS` (default 400 M pixels), gets a row
error saying its size and the limit (0 turns a limit off; Pillow's own bomb limit, ~179 M pixels, still holds).
Images over 4 M pixels are decoded one at a time per process (concurrent requests wait for each other) and
downscaled as they are read: JPEGs decode at a reduced DCT scale (`draft`), others are `reduce`d right after
decoding, to at least 3x the model's input size; then the usual resize. Their pixels can therefore differ from
prepare's decoding by rounding; smaller images decode exactly as prepare decodes them. Peak memory for one process
stays about one image at the per-image limit (4 bytes a pixel), whatever the number of requests or images.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cnnpipe.data.images import DECODE_ERRORS, RESAMPLING, ImageDecodeError, _to_8bit, decode_image, square_box
from cnnpipe.data.sources import fit_images
from cnnpipe.errors import DataError

COLUMN = "image"  # the input column of DataFrames (MLflow's dataframe_split / dataframe_records JSON) and dicts
CHANNEL_COUNTS = (1, 2, 3, 4)  # gray, gray+alpha, RGB, RGBA

MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS = "CNNPIPE_MAX_IMAGE_PIXELS", 40_000_000
MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS = "CNNPIPE_MAX_REQUEST_PIXELS", 400_000_000
LARGE_IMAGE_PIXELS = 1 << 22  # above this (4.2 M pixels): decoded one at a time, downscaled as read
REDUCING_GAP = 3  # downscaled as read to at least this many times the model's input size (as decode_image resizes)
# The MLflow scoring server runs requests in threads. Large images are decoded by one thread of their own, one at a
# time: one image's pixels in memory at once, and always from the same malloc arena (decoded in each request's own
# thread, glibc keeps a freed image in every thread's arena: 4 threads, 4 images' worth of resident memory).
_LARGE_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnpipe-decode")


@dataclass(frozen=True)
class PixelLimits:
    image: int  # pixels per image (width x height), 0: none
    request: int  # pixels per call (all its images together), 0: none

    @classmethod
    def from_env(cls) -> PixelLimits:
        return cls(
            _env_limit(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS),
            _env_limit(MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS),
        )


def _env_limit(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip().replace("_", "")
    if not text:
        return default
    try:
        value = int(float(text))
    except ValueError:
        raise DataError(f"{name}={os.environ[name]!r}: expected a number of pixels (0: no limit)") from None
    if value < 0:
        raise DataError(f"{name}={os.environ[name]!r}: expected a number of pixels >= 0 (0: no limit)")
    return value


class _Budget:
    """The pixels a call may still decode."""

    def __init__(self, limits: PixelLimits) -> None:
        self.limits, self.used = limits, 0
        self.last: tuple[int, int] | None = None  # (width, height) of the image last taken: its size as it came

    def take(self, width: int, height: int) -> None:
        self.last = (int(width), int(height))
        pixels = width * height
        limit = self.limits.image
        if limit and pixels > limit:
            raise DataError(
                f"image of {width}x{height} = {pixels:,} pixels is over the limit of {limit:,} pixels per image "
                f"({MAX_IMAGE_PIXELS_ENV}); send a smaller image"
            )
        limit = self.limits.request
        if limit and self.used + pixels > limit:
            raise DataError(
                f"image of {width}x{height} = {pixels:,} pixels would take this request to {self.used + pixels:,} "
                f"pixels, over the limit of {limit:,} pixels per request ({MAX_REQUEST_PIXELS_ENV}); "
                "send fewer or smaller images per request"
            )
        self.used += pixels


@dataclass
class ImageBatch:
    images: np.ndarray  # uint8 (N, C, H, W) at the model's in_shape; a row that failed is all zeros
    errors: list[str | None]  # per row: why it could not be used, or None
    sizes: list[tuple[int, int] | None]  # per row: (width, height) as sent, before resizing; None if unreadable


def to_batch(
    model_input: Any,
    in_shape: Sequence[int],
    limits: PixelLimits | None = None,
    interpolation: str = "bilinear",
    square: bool = True,
) -> ImageBatch:
    """Normalise any accepted input to one batch at `in_shape` (C, H, W): each image's central square resized with
    `interpolation`, as prepare stored the training images (the model's spec says both; `square=False`: the whole
    image squashed, as models saved before that record were trained). Whole-input problems (a bad
    array shape or dtype, pixel arrays over the limits) raise DataError; a single undecodable file, or one over the
    pixel limits (`limits`, default from the environment), only marks its row."""
    channels, size = int(in_shape[0]), int(in_shape[-1])
    budget = _Budget(limits or PixelLimits.from_env())
    cells = _cells(model_input)
    if isinstance(cells, np.ndarray):
        batch = _batch_nchw(cells, in_shape)
        for _ in range(len(batch)):
            budget.take(batch.shape[-1], batch.shape[-2])
        fitted = _fit_pixels(batch, channels, size, interpolation, square)
        return ImageBatch(fitted, [None] * len(cells), [budget.last] * len(cells))
    images = np.zeros((len(cells), channels, size, size), dtype=np.uint8)
    errors: list[str | None] = [None] * len(cells)
    sizes: list[tuple[int, int] | None] = [None] * len(cells)
    for i, cell in enumerate(cells):
        budget.last = None
        try:
            images[i] = _one_image(cell, in_shape, budget, interpolation, square)
        except (ImageDecodeError, DataError) as exc:
            errors[i] = str(exc)
        sizes[i] = budget.last
    return ImageBatch(images, errors, sizes)


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


def _one_image(cell: Any, in_shape: Sequence[int], budget: _Budget, interpolation: str, square: bool) -> np.ndarray:
    """One item: encoded bytes, base64 text, or the pixels of one image."""
    channels, size = int(in_shape[0]), int(in_shape[-1])
    if isinstance(cell, str):
        cell = _from_base64(cell)
    if isinstance(cell, (bytes, bytearray, memoryview)):
        try:
            return _decode_bounded(bytes(cell), channels, size, budget, interpolation, square)
        except ImageDecodeError as exc:  # Pillow names the file object: "<_io.BytesIO object at 0x...>"
            raise ImageDecodeError(re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))) from None
    pixels = np.asarray(cell)
    if pixels.ndim in (2, 3):
        height, width = (pixels.shape if pixels.ndim == 2 else _hw(pixels.shape, in_shape))[-2:]
        budget.take(width, height)
    if pixels.ndim == 2:
        pixels = pixels[None]
    elif pixels.ndim == 3:
        pixels = pixels if _channels_first(pixels.shape, in_shape) else pixels.transpose(2, 0, 1)
    else:
        raise DataError(f"one image must be (H, W), (H, W, C) or (C, H, W), got shape {pixels.shape}")
    return _fit_pixels(pixels[None], channels, size, interpolation, square)[0]


def _hw(shape: Sequence[int], in_shape: Sequence[int]) -> tuple[int, int]:
    """(height, width) of one 3-D image, channels first or last."""
    return (shape[1], shape[2]) if _channels_first(shape, in_shape) else (shape[0], shape[1])


def _decode_bounded(
    data: bytes, channels: int, size: int, budget: _Budget, interpolation: str, square: bool
) -> np.ndarray:
    """Encoded bytes -> uint8 (channels, size, size), its size checked against `budget` from the header first.
    Up to LARGE_IMAGE_PIXELS exactly as prepare decodes (`decode_image`); larger ones downscaled as read."""
    try:
        with warnings.catch_warnings():
            # Our limits decide; Pillow's warning threshold (89 M pixels) would otherwise refuse what they allow.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:  # lazy: the header only, no pixels yet
                width, height = img.size
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    budget.take(width, height)
    if width * height <= LARGE_IMAGE_PIXELS:
        return decode_image(io.BytesIO(data), channels, size, interpolation, square)  # type: ignore[arg-type]
    try:
        return _LARGE_DECODER.submit(_decode_large, data, channels, size, interpolation, square).result()
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _decode_large(
    data: bytes, channels: int, size: int, interpolation: str = "bilinear", square: bool = True
) -> np.ndarray:
    """A large image decoded small: JPEG at the smallest DCT scale still >= REDUCING_GAP x `size`, anything else
    `reduce`d by a whole factor right after decoding (palette, bilevel and 16-bit modes converted first, as reduce
    needs); then the steps of `decode_image` after its load, on the small image."""
    target = REDUCING_GAP * size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as opened:
            if opened.format == "JPEG":
                opened.draft(None, (target, target))
            opened.load()
            img: Image.Image = opened
            sixteen = img.mode.startswith("I;16")
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
            elif img.mode == "1":
                img = img.convert("L")
            elif sixteen:
                img = img.convert("I")
            factor = min(img.size) // target
            if factor >= 2:
                img = img.reduce(factor)
            if sixteen:
                img = img.convert("I;16")  # back to 16 bits: decode_image's stretch treats them as such
            img = ImageOps.exif_transpose(img)
    # From here on, decode_image's own steps (cnnpipe.data.images), on a small image.
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        box = square_box(*img.size) if square else None
        img = img.resize((size, size), RESAMPLING[interpolation], box=box, reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1).copy()


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


def _fit_pixels(
    pixels: np.ndarray, channels: int, size: int, interpolation: str = "bilinear", square: bool = True
) -> np.ndarray:
    """uint8 (N, C, H, W) with any C in 1..4 -> the model's channels and size; alpha composited over black."""
    x = _as_uint8(pixels)
    if x.shape[1] not in CHANNEL_COUNTS:
        raise DataError(f"images have {x.shape[1]} channels; expected 1 (gray), 2, 3 (RGB) or 4 (RGBA)")
    if x.shape[1] in (2, 4):  # gray+alpha / RGBA: over a black background, as decode_image does
        alpha = x[:, -1:].astype(np.float32) / 255.0
        x = np.rint(x[:, :-1].astype(np.float32) * alpha).astype(np.uint8)
    return fit_images(x, channels, size, interpolation, square)


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
