"""Model families by name: `model.name` -> the builder that makes the network.

A family registers its builder where it is defined (`@register_model("cnn", "cnn_bn")` in models/cnn.py), and
`cnnpipe/models/__init__.py` imports each family module, so importing anything under `cnnpipe.models` fills
the registry. Adding a model is its module (the nn.Module and a registered builder), one import line in
models/__init__.py, and one YAML in conf/model/ whose `name` is the registered name; tests/test_registries.py
checks that every conf/model option has a builder and every builder a conf/model option.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from cnnpipe.config import ModelConfig
from cnnpipe.registry import Registry


class ModelBuilder(Protocol):
    """`builder(model_cfg, in_shape=(C, H, W), num_classes=K, mean=[...], std=[...])` -> a logits-producing net
    whose first layer is `layers.Normalize(mean, std, size=H)` (centre crop to the input size, then normalise);
    `in_shape` is the network's input. A family with pretrained weights (model=timm) also takes `pretrained: bool`,
    passed as True only when its config asks for them: fit loads them; a saved model is rebuilt without them and
    loads its own."""

    def __call__(
        self,
        cfg: ModelConfig,
        *,
        in_shape: tuple[int, int, int],
        num_classes: int,
        mean: list[float],
        std: list[float],
    ) -> nn.Module: ...


MODELS: Registry[ModelBuilder] = Registry("model.name")
register_model = MODELS.register  # `@register_model("cnn", "cnn_bn")`
unregister_model = MODELS.unregister
model_names = MODELS.names
model_builder = MODELS.get
