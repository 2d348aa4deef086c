"""Decode one image file with Pillow into a uint8 (C, H, W) array of the configured channels and size."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# What Pillow raises for files it cannot use: unknown format, truncated data, bad headers, image bombs.
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class ImageDecodeError(Exception):
    """One file could not be decoded; the prepare stage skips it and lists it in meta.json."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images stretched to 0..255 (Pillow's convert('L') would clip them).
    A single-valued image has no range to stretch: it keeps its level within the mode's full range."""
    arr = np.asarray(img, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        full = 65535.0 if img.mode.startswith("I;16") else (1.0 if img.mode == "F" and hi <= 1.0 else 255.0)
        scaled = np.clip(arr * (255.0 / full), 0, 255)
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L")


RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The central square of a width x height image (left, top, right, bottom): what remains of a photo once its
    short side is resized to the stored size, as torchvision's Resize(short side) + CenterCrop keep it."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class Decoded:
    """A decoded image (uint8 (channels, size, size)) and what the file held: its size as shown (EXIF orientation
    applied) and its Pillow mode, for prepare's summary of the source images."""

    pixels: np.ndarray
    width: int
    height: int
    mode: str


def decode_image(
    path: Path, channels: int, size: int, interpolation: str = "bilinear", square: bool = True
) -> np.ndarray:
    """uint8 array (channels, size, size): the image's central square (`square=False`: the whole image, squashed,
    as models saved before the preprocessing record were trained), resized with `interpolation`; EXIF
    orientation applied; alpha composited over black."""
    return decode_image_info(path, channels, size, interpolation, square).pixels


def decode_image_info(
    path: Path, channels: int, size: int, interpolation: str = "bilinear", square: bool = True
) -> Decoded:
    """`decode_image`'s pixels with the source image's size and mode (read on the way: nothing decoded twice)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                mode = opened.mode
                img = ImageOps.exif_transpose(opened)
        width, height = img.size
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            img = _to_8bit(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, rgba)
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size, size):
            box = square_box(*img.size) if square else None
            img = img.resize((size, size), RESAMPLING[interpolation], box=box, reducing_gap=3.0)
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    arr = np.asarray(img, dtype=np.uint8)
    pixels = arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1).copy()
    return Decoded(pixels, width, height, mode)
