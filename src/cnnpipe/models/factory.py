"""Build a model from its spec: config + what prepare measured (shape, classes, mean/std).

The spec is a plain dict saved next to the weights (models/model.json), so a model is rebuilt from
JSON + safetensors with no pickle involved.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from cnnpipe.config import ModelConfig
from cnnpipe.models.cnn import ClassicCNN
from cnnpipe.models.resnet import ResNetSmall


def model_spec(model_cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": asdict(model_cfg),
        "in_shape": list(meta["image_shape"]),
        "classes": list(meta["classes"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
    }


def build_model(spec: dict[str, Any]) -> nn.Module:
    m = ModelConfig(**spec["model"])
    in_shape = tuple(spec["in_shape"])
    num_classes = len(spec["classes"])
    if m.name in ("cnn", "cnn_bn"):
        return ClassicCNN(
            in_shape,
            num_classes,
            m.channels,
            m.convs_per_block,
            m.hidden,
            m.dropout,  # type: ignore[arg-type]
            m.batch_norm,
            spec["mean"],
            spec["std"],
        )
    if m.name == "resnet_small":
        return ResNetSmall(
            in_shape,
            num_classes,
            m.channels,
            m.convs_per_block,
            m.hidden,
            m.dropout,  # type: ignore[arg-type]
            spec["mean"],
            spec["std"],
        )
    raise ValueError(f"unknown model {m.name!r}")  # unreachable after config validation
