"""Optimisers by name: `optim.name` -> a builder `(params, OptimConfig) -> torch.optim.Optimizer`.

Adding an optimiser is one registered builder here and one YAML in conf/optim/ whose `name` is the registered
name (tests/test_registries.py checks that every conf/optim option has a builder and every builder an option).
The scheduler (`optim.scheduler`) is not the builder's business: training/module.py wraps any optimiser.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cnnpipe.config import OptimConfig
from cnnpipe.models.transfer import head_parameter_names
from cnnpipe.registry import Registry

OptimizerBuilder = Callable[[Any, OptimConfig], torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optim.name")
register_optimizer = OPTIMIZERS.register  # `@register_optimizer("adamw")`
unregister_optimizer = OPTIMIZERS.unregister
optimizer_names = OPTIMIZERS.names


def build_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser registered as `cfg.name` over `params` (tensors, or param groups from `parameter_groups`)."""
    return OPTIMIZERS.get(cfg.name)(params, cfg)


def parameter_groups(net: nn.Module, cfg: OptimConfig, lr: float) -> list[dict[str, Any]]:
    """The fine-tuning recipe's groups: the head at `lr`, the backbone at `lr * optim.backbone_lr`; weight decay on
    weight matrices and kernels only, not on norm weights and biases (1-D tensors, timm's rule) unless
    `optim.decay_norm_bias`. Every parameter is in a group, frozen ones too (FreezeBackbone unfreezes them later
    without a new group, which keeps the schedules valid). Empty groups are left out.

    Written here rather than taken from timm (`param_groups_weight_decay`, `param_groups_layer_decay`): those cover
    timm networks only, and this one rule serves cnnpipe's own families and timm's alike."""
    head = head_parameter_names(net)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        decay = cfg.decay_norm_bias or p.ndim > 1
        groups.setdefault((name in head, decay), []).append(p)
    return [
        {
            "params": params,
            "lr": lr if in_head else lr * cfg.backbone_lr,
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (in_head, decay), params in sorted(groups.items(), reverse=True)
    ]


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
