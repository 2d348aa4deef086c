"""Training-batch augmentation on the device, every image its own draw (augment.online): random-resized crops from
the stored images to the network's input size, horizontal flips, and a RandAugment / TrivialAugment policy.

kornia does the image operations (`kornia.augmentation`: per-image parameters on a batch, on any device). Its
RandAugment and TrivialAugment modules pick their operations once per *batch*, though: a batch of 256 gets the
same two operations. `PerImagePolicy` keeps kornia's operations (the policy's children, each drawing its own
per-image magnitude within kornia's range) and only changes who gets which: each image draws its own
operation(s), and each operation runs once on the images that drew it. The draws are made on the CPU, so no step
waits on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnpipe.config import OnlineAugmentConfig

RANDAUGMENT_OPS = 2  # operations per image (RandAugment's N)
CROP_RATIO = (3 / 4, 4 / 3)  # random-resized crops' aspect ratios (torchvision's and timm's default)


class PerImagePolicy(nn.Module):
    """`ops` operations per image, each drawn uniformly (with replacement) from `choices`."""

    def __init__(self, choices: list[nn.Module], ops: int, seed: int = 0) -> None:
        super().__init__()
        self.choices = nn.ModuleList(choices)
        self.ops = ops
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.shape[1] == 1
        if grey:  # kornia's colour operations need RGB: grey repeated, then averaged back
            x = x.expand(-1, 3, -1, -1)
        x = x.clone()
        for _ in range(self.ops):
            drawn = torch.randint(len(self.choices), (x.shape[0],), generator=self.gen)
            for k, op in enumerate(self.choices):
                rows = (drawn == k).nonzero().flatten()
                if len(rows):
                    index = rows.to(x.device, non_blocking=True)
                    x[index] = op(x[index]).to(x.dtype)
        return x.mean(1, keepdim=True) if grey else x


class OnlineAugment(nn.Module):
    """float images in [0, 1] at the stored size -> augmented images (input size when cropping)."""

    def __init__(self, cfg: OnlineAugmentConfig, input_size: int, seed: int = 0) -> None:
        super().__init__()
        import kornia.augmentation as K
        from kornia.augmentation import auto

        geometric: list[nn.Module] = []
        if cfg.crop_scale is not None:
            scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))
            geometric.append(K.RandomResizedCrop((input_size, input_size), scale=scale, ratio=CROP_RATIO))
        if cfg.hflip:
            geometric.append(K.RandomHorizontalFlip())
        self.geometric = nn.Sequential(*geometric)
        self.policy: PerImagePolicy | None = None
        if cfg.policy == "randaugment":
            self.policy = PerImagePolicy(list(auto.RandAugment(n=1, m=9).children()), RANDAUGMENT_OPS, seed)
        elif cfg.policy == "trivialaugment":
            self.policy = PerImagePolicy(list(auto.TrivialAugment().children()), 1, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.geometric(x)
        if self.policy is not None:
            x = self.policy(x)
        return x.clamp_(0, 1)


def reseed(module: nn.Module, seed: int) -> None:
    """Restart every PerImagePolicy's draws from `seed` (the training module does so each epoch, with the global
    torch RNG that kornia draws from: a resumed run augments its epochs as an uninterrupted one would)."""
    for m in module.modules():
        if isinstance(m, PerImagePolicy):
            m.gen.manual_seed(seed)


def online_augment(cfg: OnlineAugmentConfig, input_size: int, seed: int = 0) -> OnlineAugment | None:
    """The batch augmentation `cfg` asks for, or None when it asks for none."""
    if cfg.crop_scale is None and not cfg.hflip and cfg.policy == "none":
        return None
    return OnlineAugment(cfg, input_size, seed)
