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
from cnnpipe.data.preprocess import prepared_geometry, resolve_normalisation
from cnnpipe.models.registry import model_builder


def model_spec(model_cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """The model's config, the images it takes as stored (`in_shape`, storage size) and everything that turns
    them into its input (data/preprocess.py): what evaluation, the pyfunc model and predict.py rebuild from."""
    geometry = prepared_geometry(meta)
    mean, std = resolve_normalisation(model_cfg, int(meta["image_shape"][0]), meta)
    return {
        "model": asdict(model_cfg),
        "in_shape": list(meta["image_shape"]),
        "classes": list(meta["classes"]),
        "mean": mean,
        "std": std,
        "input_size": geometry.input_size,
        "interpolation": geometry.interpolation,
        "crop_pct": geometry.crop_pct,
    }


def build_model(spec: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """The family registered as `spec["model"]["name"]` (models/registry.py), built for the spec's data.
    `pretrained`: with the family's pretrained weights (fit); a saved model is rebuilt without and loads its own.
    A spec written before the model config grew keys gets those keys' neutral values (ModelConfig has no defaults)."""
    m = ModelConfig(**{**LEGACY_MODEL_KEYS, **spec["model"]})
    c, h, _ = (int(d) for d in spec["in_shape"])
    size = int(spec.get("input_size", h))
    # Only a family whose config asks for pretrained weights gets the flag (config allows that for timm only).
    extra = {"pretrained": True} if pretrained and m.pretrained else {}
    return model_builder(m.name)(
        m,
        in_shape=(c, size, size),
        num_classes=len(spec["classes"]),
        mean=list(spec["mean"]),
        std=list(spec["std"]),
        **extra,
    )


# Keys a model.json written before pretrained backbones does not have, with the values that mean "as it was then".
LEGACY_MODEL_KEYS: dict[str, Any] = {
    "arch": None,
    "pretrained": False,
    "weights": None,
    "mean": None,
    "std": None,
    "interpolation": None,
    "crop_pct": None,
}
