"""When a training step may call `loss.backward()` and the optimiser itself instead of going through
Lightning's `manual_backward` / `LightningOptimizer.step`.

Those two wrappers cost ~0.2 ms each per step (hook dispatch through every callback, profiler contexts,
precision-plugin indirection: bench/findings.md, B1), 4-5 % of a small CPU step. On one device or under plain
DDP, with a precision plugin that adds nothing to backward or step (fp32, or bf16 autocast, which needs no
loss scaling) and with no callback listening to the per-step hooks, they do nothing but dispatch and the
strategy's own `pre_backward` / `post_backward` (DDP: prepare the reducer so the step's gradients are
all-reduced), which the direct step calls itself: the same update. Anywhere else (fp16 loss scaling,
FSDP, DeepSpeed, a gradient-logging callback) the step goes through Lightning as usual.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def can_step_directly(trainer: pl.Trainer) -> bool:
    # Exact types: a subclass (FSDP, DeepSpeed, ddp_spawn's or a user's own) may do more around the step.
    # DDPStrategy's optimizer_step adds nothing unless a post-local-SGD comm hook is configured, which
    # `trainer.strategy: ddp` never does.
    if type(trainer.strategy) not in (SingleDeviceStrategy, DDPStrategy):
        return False
    plugin = trainer.precision_plugin
    plain = type(plugin) is Precision or (type(plugin) is MixedPrecision and plugin.scaler is None)
    if not plain:
        return False
    module = trainer.lightning_module
    if any(is_overridden(hook, module, pl.LightningModule) for hook in ("backward", *STEP_HOOKS[:2])):
        return False
    return not any(is_overridden(hook, cb, Callback) for cb in trainer.callbacks for hook in STEP_HOOKS)
