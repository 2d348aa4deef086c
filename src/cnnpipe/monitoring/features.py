"""What the monitor compares, measured on each image as the network receives it: cheap input statistics and the
network's penultimate-layer embedding (the input of its classifier layer), projected on a few principal axes.

The same functions measure the training reference (at training time, on the validation split) and every served
image (the prediction log), so the two are comparable by construction."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Observed:
    """What the prediction log keeps of each image besides the answer: its size as sent (0 where unreadable), the
    brightness and contrast of the pixels the network saw, and the embedding summary (None: no reference axes)."""

    images: np.ndarray  # uint8 (N, C, H, W), as the network received them
    width: np.ndarray
    height: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    embedding: np.ndarray | None  # (N, K) on the reference's principal axes


def input_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightness (mean) and contrast (standard deviation) of each uint8 (N, C, H, W) image, over all its pixels
    and channels, on a 0..1 scale: the pixels the network saw, after decoding and resizing, before normalising."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return flat.mean(axis=1).astype(np.float64), flat.std(axis=1).astype(np.float64)


def classifier_layer(net: nn.Module, example: torch.Tensor, n_classes: int) -> str | None:
    """The name of the layer that outputs the logits, found by tracing one forward pass: the last `nn.Linear` called
    whose output is (N, n_classes). Its input is the penultimate embedding, whatever the family (cnnpipe's cnn and
    resnet, timm CNNs and ViTs alike). None when the logits come from no linear layer (a 1x1-conv head)."""
    called: list[tuple[str, tuple[int, ...]]] = []
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: called.append((name, tuple(o.shape))))
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for handle in handles:
            handle.remove()
    heads = [name for name, shape in called if len(shape) == 2 and shape[-1] == n_classes]
    return heads[-1] if heads else None


class Tap:
    """A forward hook on `layer` that keeps the layer's input (flattened to (N, D), float32, on the CPU) only for
    the thread inside `capture()`. The MLflow scoring server answers requests in threads on one shared network: a
    hook that kept every pass would give one request's embeddings to another. Installed once; outside `capture()`
    it costs one attribute lookup a forward pass."""

    def __init__(self, net: nn.Module, layer: str) -> None:
        self._local = threading.local()
        net.get_submodule(layer).register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        sink = getattr(self._local, "sink", None)
        if sink is not None:
            sink.append(inputs[0].detach().flatten(1).float().cpu())

    @contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        self._local.sink = []
        try:
            yield self._local.sink
        finally:
            self._local.sink = None


def principal_axes(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and the top-`k` principal axes (k, D) of the reference embeddings (an SVD; signs fixed so that
    each axis's largest coefficient is positive: the same data always gives the same axes)."""
    mean = embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    axes = vt[: min(k, len(vt))]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    return mean.astype(np.float32), (axes * signs[:, None]).astype(np.float32)


def project(embeddings: np.ndarray, mean: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Embeddings (N, D) -> their coordinates (N, k) on the reference's principal axes: the embedding summary the
    prediction log keeps (k numbers an image, not D)."""
    return ((embeddings - mean) @ axes.T).astype(np.float32)
