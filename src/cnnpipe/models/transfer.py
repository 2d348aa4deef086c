"""Transfer learning: copy every tensor of a trained model into a new one where name and shape agree.

The new classifier layer (a different number of classes) and the input normalisation (the new data's
mean/std) are left as initialised; everything else — the convolutional backbone — comes from the source."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HEAD_PREFIX = "head."
NORMALIZE_PREFIX = "normalize."


@dataclass
class TransferReport:
    loaded: list[str]
    skipped: list[str]  # in the target, not taken from the source (missing there, or another shape)


def backbone_modules(net: nn.Module) -> list[nn.Module]:
    """Everything but the fully connected head: what `model.freeze_epochs` keeps frozen."""
    return [m for name, m in net.named_children() if name not in ("head", "normalize")]


def transfer_weights(target: nn.Module, source: dict[str, torch.Tensor]) -> TransferReport:
    own = target.state_dict()
    loaded, skipped = [], []
    for key, tensor in own.items():
        candidate = source.get(key)
        if key.startswith(NORMALIZE_PREFIX) or candidate is None or candidate.shape != tensor.shape:
            skipped.append(key)
            continue
        own[key] = candidate.to(tensor.dtype)
        loaded.append(key)
    target.load_state_dict(own)
    return TransferReport(loaded, skipped)
