"""Build a model from its spec: config + what prepare measured (shape, classes, mean/std).

The spec is a plain dict saved next to the weights (models/model.json), so a model is rebuilt from
JSON + safetensors with no pickle involved. Which network a name means is the registry's business
(models/registry.py): this module knows no model names.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from cnnpipe.config import ModelConfig
from cnnpipe.models.registry import model_builder


def model_spec(model_cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": asdict(model_cfg),
        "in_shape": list(meta["image_shape"]),
        "classes": list(meta["classes"]),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
    }


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The family registered as `spec["model"]["name"]` (models/registry.py), built for the spec's data."""
    m = ModelConfig(**spec["model"])
    c, h, w = spec["in_shape"]
    return model_builder(m.name)(
        m,
        in_shape=(int(c), int(h), int(w)),
        num_classes=len(spec["classes"]),
        mean=list(spec["mean"]),
        std=list(spec["std"]),
    )
