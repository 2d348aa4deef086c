"""B2: batched augmentation (`cnnpipe.data.augment.augment_batch` on whole batches) vs a per-sample
`torch.utils.data.DataLoader` applying the same transforms one image at a time.

Both sides: the prepared digits train split (uint8 on the CPU), the default `augment` config, the same batch
size (64), shuffled passes over the split (4 x `augment.copies` of them, 1 x with --quick), the
same thread count, seeded generators. The per-sample version below does the same ops with the same
parameter ranges (affine via affine_grid + grid_sample, hflip, brightness/contrast, noise, erase, clamp),
drawing each image's parameters as Python scalars, as a torchvision-style transform does.
Also measured (not in the ratio): the augment stage's own call, `augment_copies` (default chunks: 8192 digits).

Run alone: python -m bench.b2_augment [--quick] [--repeats N] [--threads N]
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bench.timing import cli, interleaved, median, paired_ratios, pin_threads, result, spread, stopwatch, write_result
from bench.workspace import bench_config, quiet

NAME = "B2"
BATCH = 64


def _u(lo: float, hi: float, gen: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def augment_one(x: torch.Tensor, cfg: Any, gen: torch.Generator) -> torch.Tensor:
    """One float image (C, H, W) in [0, 1]: the ops of `augment_batch`, in the same order, per image."""
    c, h, w = x.shape
    if cfg.rotate or cfg.translate or tuple(cfg.scale) != (1.0, 1.0):
        angle = math.radians(_u(-cfg.rotate, cfg.rotate, gen))
        zoom = _u(cfg.scale[0], cfg.scale[1], gen)
        tx, ty = _u(-cfg.translate, cfg.translate, gen) * 2, _u(-cfg.translate, cfg.translate, gen) * 2
        cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
        theta = torch.tensor([[[cos, -sin, tx], [sin, cos, ty]]], dtype=x.dtype)
        grid = F.affine_grid(theta, [1, c, h, w], align_corners=False)
        x = F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if cfg.hflip and float(torch.rand((), generator=gen)) < 0.5:
        x = x.flip(-1)
    if cfg.brightness or cfg.contrast:
        shift = _u(-cfg.brightness, cfg.brightness, gen)
        factor = 1 + _u(-cfg.contrast, cfg.contrast, gen)
        mean = x.mean()
        x = (x - mean) * factor + mean + shift
    if cfg.noise_std:
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    if cfg.erase_prob and float(torch.rand((), generator=gen)) < cfg.erase_prob:
        frac = _u(cfg.erase_area[0], cfg.erase_area[1], gen)
        aspect = math.exp(_u(-math.log(3), math.log(3), gen))
        eh = int(min(max(round(math.sqrt(frac * h * w * aspect)), 1), h))
        ew = int(min(max(round(math.sqrt(frac * h * w / aspect)), 1), w))
        top, left = int(_u(0, h - eh + 1, gen)), int(_u(0, w - ew + 1, gen))
        x = x.clone()
        x[:, top : top + eh, left : left + ew] = 0.0
    return x.clamp(0.0, 1.0)


class PerSampleAugmented(Dataset):
    """A map-style dataset that augments one image per __getitem__ (the common torchvision pattern)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: Any, seed: int) -> None:
        self.images, self.labels, self.cfg = images, labels, cfg
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return augment_one(self.images[i].float().div(255.0), self.cfg, self.gen), self.labels[i]


def per_sample(images: torch.Tensor, labels: torch.Tensor, cfg: Any, seed: int, passes: int) -> float:
    loader = DataLoader(
        PerSampleAugmented(images, labels, cfg, seed),
        batch_size=BATCH,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    with stopwatch() as t:
        for _ in range(passes):
            for x, _y in loader:
                assert x.shape[0] <= BATCH
    return t["s"]


def batched(images: torch.Tensor, labels: torch.Tensor, cfg: Any, seed: int, passes: int) -> float:
    from cnnpipe.data.augment import augment_batch, to_float

    gen = torch.Generator().manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    with stopwatch() as t:
        for _ in range(passes):
            order = torch.randperm(n, generator=order_gen)
            for start in range(0, n, BATCH):
                idx = order[start : start + BATCH]
                x, _y = augment_batch(to_float(images[idx]), cfg, gen), labels[idx]
                assert x.shape[0] <= BATCH
    return t["s"]


def stage_call(images: Any, labels: Any, cfg: Any, seed: int) -> float:
    from cnnpipe.data.augment import augment_copies

    with stopwatch() as t:
        augment_copies(images, labels, cfg, seed=seed)
    return t["s"]


def run(repeats: int | None = None, quick: bool = False, threads: int = 1) -> dict:
    repeats = repeats or (5 if quick else 9)
    pin_threads(threads)
    quiet()
    from cnnpipe.data.store import load_split
    from cnnpipe.stages.prepare import prepare_splits

    cfg = bench_config(["augment=default"])
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-b2-") as tmp:
        prepare_splits(cfg, Path(tmp) / "prepared")
        split = load_split(Path(tmp) / "prepared" / "train.npz")
    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    aug = cfg.augment
    passes = max(1, aug.copies) * (1 if quick else 4)  # full: ~20k images per repeat, >= 0.05 s timed
    total = passes * len(labels)
    samples = interleaved(
        {
            "batched": lambda: batched(images, labels, aug, cfg.seed, passes),
            "per_sample": lambda: per_sample(images, labels, aug, cfg.seed, passes),
            "stage": lambda: stage_call(split.images, split.labels, aug, cfg.seed),
        },
        repeats,
        warmup=1,
        label=NAME,
    )
    ours_ips = [total / s for s in samples["batched"]]
    base_ips = [total / s for s in samples["per_sample"]]
    stage_ips = [max(1, aug.copies) * len(labels) / s for s in samples["stage"]]
    ratio = median(paired_ratios(ours_ips, base_ips))
    op_names = ("rotate", "translate", "hflip", "brightness", "contrast", "noise_std", "erase_prob")
    ops = [k for k in op_names if getattr(aug, k)]
    details = {
        "unit": "images/s",
        "batched_images_per_s": spread(ours_ips),
        "per_sample_images_per_s": spread(base_ips),
        "stage_augment_copies_images_per_s": spread(stage_ips),
        "samples_s": samples,
        "ratio_per_repeat": paired_ratios(ours_ips, base_ips),
        "repeats": repeats,
        "warmup": 1,
        "images_per_repeat": total,
        "image_shape": list(images.shape[1:]),
        "batch_size": BATCH,
        "ops": ops + ["scale"] * (tuple(aug.scale) != (1.0, 1.0)),
        "seed": cfg.seed,
        "dataloader": "torch.utils.data.DataLoader, num_workers=0, shuffle, per-image transform in __getitem__",
    }
    record = result(
        name=NAME,
        title="batched augmentation",
        what=f"augmented images/s, digits {tuple(images.shape[1:])}, default augment ops, batch {BATCH}",
        ours=f"{median(ours_ips):,.0f} img/s (augment_batch)",
        baseline=f"{median(base_ips):,.0f} img/s (per-sample DataLoader)",
        ratio=ratio,
        ratio_label="batched/per-sample",
        goal_op=">=",
        goal=5.0,
        threads=threads,
        quick=quick,
        details=details,
        notes=[f"the augment stage's own call (augment_copies, default chunks): {median(stage_ips):,.0f} img/s"],
    )
    write_result(record)
    return record


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv)
    run(args.repeats, args.quick, args.threads)


if __name__ == "__main__":
    main()
