"""Transfer learning: copy every tensor of a trained model into a new one where name and shape agree.

The new classifier layer (a different number of classes) and the input normalisation (the new data's
mean/std) are left as initialised; everything else — the convolutional backbone — comes from the source."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnpipe.models.layers import NORMALIZE_PREFIX


@dataclass
class TransferReport:
    loaded: list[str]
    skipped: list[str]  # in the target, not taken from the source (missing there, or another shape)


def head_modules(net: nn.Module) -> list[nn.Module]:
    """The classifier(s) that map features to the data's classes: a family's `head_modules()` (a timm network's
    classifier; two for a distilled one, head and head_dist) or its `head` (cnnpipe's own families); none for a
    network with neither."""
    finder = getattr(net, "head_modules", None)
    heads = finder() if callable(finder) else [getattr(net, "head", None)]
    return [h for h in heads if isinstance(h, nn.Module)]


def head_module(net: nn.Module) -> nn.Module | None:
    """The one classifier of a network that has one (tests and callers that know their family)."""
    heads = head_modules(net)
    return heads[0] if len(heads) == 1 else None


def head_parameter_names(net: nn.Module) -> set[str]:
    """The qualified names of the head's parameters (the new head: full lr, never frozen)."""
    own = {id(p) for head in head_modules(net) for p in head.parameters()}
    return {name for name, p in net.named_parameters() if id(p) in own}


def backbone_modules(net: nn.Module) -> list[nn.Module]:
    """The largest sub-modules that do not hold the head (and not the input Normalize layer): what
    `model.freeze_epochs` keeps frozen, whether the head is a top-level child (cnnpipe's families) or nested
    (a timm ConvNeXt's head.fc)."""
    heads = head_modules(net)

    def outside(root: nn.Module) -> list[nn.Module]:
        found: list[nn.Module] = []
        for name, child in root.named_children():
            if any(child is h for h in heads) or name == "normalize":
                continue
            if any(m is h for m in child.modules() for h in heads):
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
