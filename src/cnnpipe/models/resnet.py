"""Small ResNet (basic residual blocks) sized for 8x8 to 64x64 inputs."""

from __future__ import annotations

import torch
from torch import nn

from cnnpipe.config import ModelConfig
from cnnpipe.models.layers import Normalize, mlp_head
from cnnpipe.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem conv, then one stage per width (stride 2 from the second stage on), global average pool."""

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int,
        channels: list[int],
        blocks_per_stage: int,
        hidden: list[int],
        dropout: float,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__()
        c, h, _ = in_shape
        self.normalize = Normalize(mean, std, size=h)
        self.stem = nn.Sequential(
            nn.Conv2d(c, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        c = channels[0]
        for i, width in enumerate(channels):
            stride = 2 if i > 0 and h >= 2 else 1
            h = -(-h // stride)
            for j in range(blocks_per_stage):
                stages.append(BasicBlock(c, width, stride if j == 0 else 1))
                c = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = mlp_head(c, hidden, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(self.normalize(x)))))


@register_model("resnet_small")
def build_resnet_small(
    cfg: ModelConfig,
    *,
    in_shape: tuple[int, int, int],
    num_classes: int,
    mean: list[float],
    std: list[float],
) -> nn.Module:
    """conf/model/resnet_small.yaml: `convs_per_block` is the number of residual blocks per stage (BatchNorm
    always: `batch_norm` does not apply)."""
    return ResNetSmall(in_shape, num_classes, cfg.channels, cfg.convs_per_block, cfg.hidden, cfg.dropout, mean, std)
