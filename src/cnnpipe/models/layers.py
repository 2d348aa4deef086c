"""Layers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn

NORMALIZE_PREFIX = "normalize."  # the families' attribute for their Normalize layer, in state-dict keys


class Normalize(nn.Module):
    """The network's first layer: a centre crop to its input `size` when given a larger image, then per-channel
    (x - mean) / std. Inside the model, so a saved model carries its own preprocessing: evaluation and serving
    feed images as prepare stored them (`input size / crop_pct`, data/preprocess.py) and get the resize +
    centre crop a pretrained network expects; training batches arrive already cropped to `size`."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: list[float], std: list[float], size: int | None = None) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (centre_crop(x, self.size) - self.mean) / self.std


def centre_crop(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """The central `size` x `size` of a (N, C, H, W) batch (a view); smaller or equal images are left as they are."""
    h, w = x.shape[-2:]
    if size is None or (h <= size and w <= size):
        return x
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[..., top : top + size, left : left + size]


def mlp_head(in_features: int, hidden: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Fully connected layers (ReLU, dropout before each) ending in class logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
