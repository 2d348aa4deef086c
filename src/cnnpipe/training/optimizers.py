"""Optimisers by name: `optim.name` -> a builder `(params, OptimConfig) -> torch.optim.Optimizer`.

Adding an optimiser is one registered builder here and one YAML in conf/optim/ whose `name` is the registered
name (tests/test_registries.py checks that every conf/optim option has a builder and every builder an option).
The scheduler (`optim.scheduler`) is not the builder's business: training/module.py wraps any optimiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cnnpipe.config import OptimConfig
from cnnpipe.registry import Registry

OptimizerBuilder = Callable[[Any, OptimConfig], torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optim.name")
register_optimizer = OPTIMIZERS.register  # `@register_optimizer("adamw")`
unregister_optimizer = OPTIMIZERS.unregister
optimizer_names = OPTIMIZERS.names


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser registered as `cfg.name` over `params`."""
    return OPTIMIZERS.get(cfg.name)(params, cfg)


@register_optimizer("sgd")
def _sgd(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,  # torch refuses Nesterov without momentum
        weight_decay=cfg.weight_decay,
    )


@register_optimizer("adam")
def _adam(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@register_optimizer("adamw")
def _adamw(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@register_optimizer("rmsprop")
def _rmsprop(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
