"""Batched, seeded image augmentation on float tensors in [0, 1], shape (N, C, H, W).

Every op draws per-image parameters as tensors and transforms the whole batch at once — no per-image
Python loop — so the same code serves the offline `augment` stage and on-device use during training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cnnpipe.config import AugmentConfig
from cnnpipe.data.store import rows_per_chunk


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def random_affine(
    x: torch.Tensor, rotate: float, translate: float, scale: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """Rotate by ±rotate degrees, shift by ±translate of the size, zoom in [scale]; zero fill."""
    n = x.shape[0]
    angle = torch.deg2rad(_uniform(n, -rotate, rotate, gen, x.device))
    zoom = _uniform(n, scale[0], scale[1], gen, x.device)
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of f of the width is 2f there.
    tx = _uniform(n, -translate, translate, gen, x.device) * 2
    ty = _uniform(n, -translate, translate, gen, x.device) * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    shift = _uniform(n, -brightness, brightness, gen, x.device).view(-1, 1, 1, 1)
    factor = 1 + _uniform(n, -contrast, contrast, gen, x.device).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean + shift


def gaussian_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)


def random_erase(x: torch.Tensor, prob: float, area: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """With probability `prob`, zero one rectangle covering `area` of the image (aspect 1:3 to 3:1)."""
    n, _, h, w = x.shape
    dev = x.device
    frac = _uniform(n, area[0], area[1], gen, dev)
    aspect = torch.exp(_uniform(n, -math.log(3), math.log(3), gen, dev))
    eh = (frac * h * w * aspect).sqrt().round().clamp(1, h)
    ew = (frac * h * w / aspect).sqrt().round().clamp(1, w)
    top = (torch.rand(n, generator=gen, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=gen, device=dev) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (rows >= top.view(-1, 1, 1))
        & (rows < (top + eh).view(-1, 1, 1))
        & (cols >= left.view(-1, 1, 1))
        & (cols < (left + ew).view(-1, 1, 1))
    )
    apply = (torch.rand(n, generator=gen, device=dev) < prob).view(-1, 1, 1)
    return x.masked_fill((inside & apply).unsqueeze(1), 0.0)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """All configured ops in order; ops whose strength is zero are skipped (no RNG drawn for them)."""
    if cfg.rotate or cfg.translate or tuple(cfg.scale) != (1.0, 1.0):
        x = random_affine(x, cfg.rotate, cfg.translate, (cfg.scale[0], cfg.scale[1]), gen)
    if cfg.hflip:
        x = random_hflip(x, gen)
    if cfg.brightness or cfg.contrast:
        x = brightness_contrast(x, cfg.brightness, cfg.contrast, gen)
    if cfg.noise_std:
        x = gaussian_noise(x, cfg.noise_std, gen)
    if cfg.erase_prob:
        x = random_erase(x, cfg.erase_prob, (cfg.erase_area[0], cfg.erase_area[1]), gen)
    return x.clamp(0.0, 1.0)


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


CHUNK_IMAGES = 8192  # images augmented per batch, at most...
CHUNK_VALUES = 1 << 22  # ...and at most this many pixel values (16 MB per float32 buffer; the ops hold a few)


def chunk_size(images: np.ndarray) -> int:
    """Images per augmentation batch: 8192 small digits at once, fewer of larger images (1,365 at 3x32x32,
    27 at 3x224x224), so memory stays bounded whatever the image size. The batch size is part of the seeded
    random stream, so it depends only on the image shape."""
    return min(CHUNK_IMAGES, rows_per_chunk(images, CHUNK_VALUES))


def augmented_chunks(
    images: np.ndarray,
    cfg: AugmentConfig,
    seed: int,
    chunk: int | None = None,
    device: str = "cpu",
) -> Iterator[np.ndarray]:
    """The original images, then `cfg.copies` augmented copies (uint8), `chunk` images at a time (default
    `chunk_size`): only one chunk is in memory, whatever the number of images and copies (`images` may be a
    memory map)."""
    chunk = chunk or chunk_size(images)
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(images), chunk):
        yield np.asarray(images[start : start + chunk])
    for _ in range(cfg.copies):
        for start in range(0, len(images), chunk):
            src = torch.from_numpy(np.array(images[start : start + chunk])).to(device)
            yield to_uint8(augment_batch(to_float(src), cfg, gen)).cpu().numpy()


def augment_copies(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: AugmentConfig,
    seed: int,
    chunk: int | None = None,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """`augmented_chunks` in one array, with the labels to match."""
    parts = list(augmented_chunks(images, cfg, seed, chunk, device))
    return np.concatenate(parts) if parts else images[:0], np.tile(labels, cfg.copies + 1)
