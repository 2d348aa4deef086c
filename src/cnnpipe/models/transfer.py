"""Transfer learning: copy every tensor of a trained model into a new one where name and shape agree.

The new classifier layer (a different number of classes) and the input normalisation (the new data's
mean/std) are left as initialised; everything else — the convolutional backbone — comes from the source."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORMALIZE_PREFIX = "normalize."


@dataclass
class TransferReport:
    loaded: list[str]
    skipped: list[str]  # in the target, not taken from the source (missing there, or another shape)


def head_module(net: nn.Module) -> nn.Module | None:
    """The classifier that maps features to the data's classes: a family's `head_module()` (a timm network's
    classifier) or its `head` (cnnpipe's own families); None for a network with neither."""
    finder = getattr(net, "head_module", None)
    head = finder() if callable(finder) else getattr(net, "head", None)
    return head if isinstance(head, nn.Module) else None


def head_parameter_names(net: nn.Module) -> set[str]:
    """The qualified names of the head's parameters (the new head: full lr, never frozen)."""
    head = head_module(net)
    own = {id(p) for p in head.parameters()} if head is not None else set()
    return {name for name, p in net.named_parameters() if id(p) in own}


def backbone_modules(net: nn.Module) -> list[nn.Module]:
    """The largest sub-modules that do not hold the head (and not the input Normalize layer): what
    `model.freeze_epochs` keeps frozen, whether the head is a top-level child (cnnpipe's families) or nested
    (a timm ConvNeXt's head.fc)."""
    head = head_module(net)

    def outside(root: nn.Module) -> list[nn.Module]:
        found: list[nn.Module] = []
        for name, child in root.named_children():
            if child is head or name == "normalize":
                continue
            if head is not None and any(m is head for m in child.modules()):
                found += outside(child)
            else:
                found.append(child)
        return found

    return outside(net)


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
