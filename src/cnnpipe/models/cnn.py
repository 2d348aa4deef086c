"""Classic CNN: blocks of (conv 3x3 -> [BatchNorm] -> ReLU) x n -> max-pool, then fully connected layers."""

from __future__ import annotations

import torch
from torch import nn

from cnnpipe.config import ModelConfig
from cnnpipe.models.layers import Normalize, mlp_head
from cnnpipe.models.registry import register_model


class ClassicCNN(nn.Module):
    """Logits out; softmax is applied by the loss in training and by `predict_proba` at inference."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: list[int],
        convs_per_block: int,
        hidden: list[int],
        dropout: float,
        batch_norm: bool,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        self.normalize = Normalize(mean, std, size=h)
        blocks: list[nn.Module] = []
        for width in channels:
            for _ in range(convs_per_block):
                blocks.append(nn.Conv2d(c, width, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    blocks.append(nn.BatchNorm2d(width))
                blocks.append(nn.ReLU(inplace=True))
                c = width
            if min(h, w) >= 2:  # pool while there is something to pool: 8x8 inputs survive deep stacks
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*blocks)
        self.head = mlp_head(c * h * w, hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


@register_model("cnn", "cnn_bn")
def build_classic_cnn(
    cfg: ModelConfig,
    *,
    in_shape: tuple[int, int, int],
    num_classes: int,
    mean: list[float],
    std: list[float],
) -> nn.Module:
    """conf/model/cnn.yaml and cnn_bn.yaml: the same family, BatchNorm and dropout as the config says."""
    return ClassicCNN(
        in_shape,
        num_classes,
        cfg.channels,
        cfg.convs_per_block,
        cfg.hidden,
        cfg.dropout,
        cfg.batch_norm,
        mean,
        std,
    )
