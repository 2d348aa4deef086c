"""Where the model looked: class-activation maps over a fixed sample of test images, drawn over the images.

The method is HiResCAM (Draelos & Carin 2020): at the network's last convolutional feature map A (C, h, w), the
map is sum over channels of dlogit/dA * A, kept where positive — captum's `LayerGradientXActivation` summed over
channels. Grad-CAM first averages the gradient over the map's positions, which is exact only when a global average
pool follows the map; cnnpipe's `cnn` family flattens its map into a linear layer (a weight per position), where
the average smears evidence onto positions the logit does not read (tests/test_attribution.py builds such a net:
HiResCAM puts all of it where the logit looks, Grad-CAM spreads it evenly). Under a global average pool the two
agree. Positive only: the picture answers "what spoke for the predicted class".

Which feature map, for any network (cnnpipe's families, timm's): the module that finishes last, in one traced
forward pass, among those after the first convolution whose output is a channels-first map (N, C, h, w) with h,
w >= 2 and the input's aspect ratio. Containers finish after their children, so this is e.g. a ResNet's `layer4`
or an EfficientNet's `bn2`; captum hands the rest of the network a copy of that output, so in-place activations
after it change nothing. A 1x1 map (8x8 digits through three pooling blocks) has no positions to point at: the
last map of at least 2x2 is taken instead. No convolution, or tokens (N, L, D) after the last map (a ViT: only
its patch embedding is convolutional), and the method does not apply: one line says why and nothing is drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradientXActivation
from torch import nn

from cnnpipe.evaluation.plots import COMPACT_ABOVE, WRONG, short_label
from cnnpipe.figures import plt, save_png

NOT_APPLICABLE = "class-activation maps need a convolutional feature map"
BATCH = 16  # images per forward/backward pass
PAIRS_PER_ROW = 4  # a panel is the image and its map side by side
NAME_CHARS = 20  # class names longer than this are shortened in panel titles
LUMA = np.array([0.299, 0.587, 0.114])  # RGB to grey (ITU-R 601)


@dataclass(frozen=True)
class FeatureMap:
    """The layer the maps are taken at, and the part of the stored image the network saw."""

    name: str  # module path in the network, "" for the network itself
    module: nn.Module
    shape: tuple[int, ...]  # its output's (C, h, w)
    seen: tuple[int, int]  # (height, width) of the central region of the image that reached the first convolution


def class_sample(labels: torch.Tensor, count: int) -> list[int]:
    """Indices of the first test images of each class in turn (class 0's first, class 1's first, ..., then each
    class's second...), up to `count`: every class shows when count allows, and the same split always gives the
    same images, so runs compare picture by picture."""
    queues = [torch.nonzero(labels == c).flatten().tolist() for c in sorted(set(labels.tolist()))]
    picked: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        picked += [q[rank] for q in queues if rank < len(q)]
        if len(picked) >= count:
            break
    return picked[:count]


def network_name(net: nn.Module) -> str:
    """timm's architecture name when the network holds a timm model (cnnpipe's TimmNet does), else its class."""
    for module in net.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(net).__name__


def find_feature_map(net: nn.Module, example: torch.Tensor) -> FeatureMap | str:
    """The layer to take class-activation maps at (see the module's docstring), or one line saying why there is
    none. `example`: one batch of float images as the network takes them."""
    names = {module: name for name, module in net.named_modules()}
    finished: list[tuple[str, nn.Module, tuple[int, ...] | None]] = []  # in the order modules return
    first_conv: list[int] = []  # index into `finished` of the first convolution's return
    seen: list[tuple[int, int]] = []

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        if isinstance(module, nn.Conv2d) and not first_conv:
            first_conv.append(len(finished))
        finished.append((names[module], module, shape))

    def record_input(module: nn.Module, inputs: tuple[object, ...]) -> None:
        if not seen and inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 4:
            seen.append((int(inputs[0].shape[-2]), int(inputs[0].shape[-1])))

    hooks = [m.register_forward_hook(record) for m in net.modules()]
    hooks += [m.register_forward_pre_hook(record_input) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            net(example)
    finally:
        for hook in hooks:
            hook.remove()
    arch = network_name(net)
    if not first_conv or not seen:
        return f"{NOT_APPLICABLE}: {arch} has no convolutional layer"
    height, width = example.shape[-2:]
    # The first convolution's input: the central crop the network's Normalize layer took, or the whole image
    # when it was not smaller (a network that resizes inside is shown the whole image).
    region = seen[0] if seen[0][0] <= height and seen[0][1] <= width else (int(height), int(width))

    def is_map(shape: tuple[int, ...] | None) -> bool:
        if shape is None or len(shape) != 4 or min(shape[2:]) < 2:
            return False
        h, w = shape[2:]  # channels last (N, h, w, C) fails the aspect check: a 7x768 "map" of a 224x224 image
        return h <= region[0] and w <= region[1] and abs(h * region[1] - w * region[0]) <= max(region)

    maps = [i for i in range(first_conv[0], len(finished)) if is_map(finished[i][2])]
    if not maps:
        return f"{NOT_APPLICABLE}: {arch}'s convolutional features have no map of at least 2x2 positions"
    name, module, shape = finished[maps[-1]]
    tokens = [(n, s) for n, _, s in finished[maps[-1] + 1 :] if s is not None and len(s) == 3]
    if tokens:
        where, later = tokens[-1]
        return (
            f"{NOT_APPLICABLE}: {arch}'s last features are tokens (N, L, D) = {later} at `{where or 'its output'}`, "
            "not a (N, C, H, W) map"
        )
    assert shape is not None
    return FeatureMap(name, module, shape[1:], region)


def class_activation_maps(net: nn.Module, images: torch.Tensor, layer: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """HiResCAM at `layer` for class `target` of each image: (N, h, w), non-negative, in logit units (each
    position's share of the target logit, to first order). `images`: float, as the network takes them."""
    attribution = LayerGradientXActivation(net, layer).attribute(images, target=target)
    assert isinstance(attribution, torch.Tensor)
    return attribution.detach().sum(dim=1).clamp_min(0.0)


def plot_class_activation_maps(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    path: Path,
    device: str | torch.device = "cpu",
    count: int = 16,
) -> str | None:
    """Writes `path` (PNG) and returns None, or writes nothing (removes a stale `path`) and returns one line saying
    why the method does not apply to this net.

    `images`: uint8 (N, C, H, W) as prepare stored them (the network takes them / 255 and crops inside); `labels`
    int64 (N,). The network is run in eval mode on `device` with gradients on; its modules' train/eval flags and
    its device are restored after, no parameter's `requires_grad` is touched (the gradients are the activations')."""
    path = Path(path)
    picked = class_sample(labels, count)
    if not picked:
        path.unlink(missing_ok=True)
        return "class-activation maps: no test images to show"
    modes = {module: module.training for module in net.modules()}
    home = next((t.device for t in [*net.parameters(), *net.buffers()]), None)  # `.to` moves tensors in place
    try:
        net.to(device).eval()
        with torch.inference_mode(False), torch.enable_grad():  # whatever mode the caller is in
            x = images[picked].to(device).float().div_(255.0)
            found = find_feature_map(net, x[:1])
            if isinstance(found, str):
                path.unlink(missing_ok=True)
                return found
            probs, preds, maps = [], [], []
            for i in range(0, len(x), BATCH):
                batch = x[i : i + BATCH]
                with torch.no_grad():
                    p = net(batch).float().softmax(dim=1)
                probs.append(p.max(dim=1).values.cpu())
                preds.append(p.argmax(dim=1))
                maps.append(class_activation_maps(net, batch, found.module, preds[-1]).float().cpu())
    finally:
        for module, training in modes.items():
            module.train(training)
        if home is not None:
            net.to(home)
    figure = _draw(
        images[picked],
        labels[picked].tolist(),
        torch.cat(preds).cpu().tolist(),
        torch.cat(probs).tolist(),
        torch.cat(maps),
        classes,
        found,
    )
    save_png(figure, path, compact_above=COMPACT_ABOVE, keep=(WRONG,))
    return None


def _class_name(classes: list[str], index: int) -> str:
    return short_label(str(classes[index]) if 0 <= index < len(classes) else str(index), NAME_CHARS)


def _as_seen(image: torch.Tensor, region: tuple[int, int]) -> np.ndarray:
    """The stored uint8 image (C, H, W) cut to the central `region` the network saw, as matplotlib shows it."""
    h, w = image.shape[-2:]
    top, left = (h - region[0]) // 2, (w - region[1]) // 2
    crop = image[:, top : top + region[0], left : left + region[1]]
    return crop[0].numpy() if crop.shape[0] != 3 else crop.permute(1, 2, 0).numpy()


def _draw(
    images: torch.Tensor,
    truth: list[int],
    preds: list[int],
    probs: list[float],
    maps: torch.Tensor,
    classes: list[str],
    found: FeatureMap,
) -> plt.Figure:
    """Pairs (image as the network saw it | the map over it), four pairs a row; each pair titled with the true and
    predicted class and the predicted probability, red and marked "wrong" when they differ. The map is scaled to
    each image's own peak: it says where, not how much."""
    n = len(truth)
    pairs_per_row = min(PAIRS_PER_ROW, n)
    rows = math.ceil(n / pairs_per_row)
    rh, rw = found.seen
    # 8x8 digits shown at ~1.3 in (crisp, nearest-neighbour pixels); 224-px photos capped at 1.9 in a panel
    panel = float(np.clip(max(rh, rw) / 110.0, 1.3, 1.9))
    fig = plt.figure(figsize=(pairs_per_row * 2 * panel + 0.2, rows * (panel + 0.55) + 0.6), layout="constrained")
    cells = fig.subfigures(rows, pairs_per_row, squeeze=False)
    # The map, upsampled smoothly over the image's pixels: at least 64 positions a side, so a 2x2 map over an
    # 8x8 digit is a gradient, not four blocks.
    scale = max(1, math.ceil(64 / max(rh, rw)))
    smooth = LayerAttribution.interpolate(maps.unsqueeze(1), (rh * scale, rw * scale), "bilinear")[:, 0]
    smooth = smooth.clamp_min(0.0)
    extent = (-0.5, rw - 0.5, rh - 0.5, -0.5)  # pixel edges, as imshow places the image
    grey = images.shape[1] != 3
    for k in range(rows * pairs_per_row):
        cell = cells[k // pairs_per_row, k % pairs_per_row]
        if k >= n:
            continue
        plain, overlay = cell.subplots(1, 2)
        seen = _as_seen(images[k], found.seen)
        shown = {"cmap": "gray", "vmin": 0, "vmax": 255} if grey else {}
        plain.imshow(seen, interpolation="nearest", **shown)
        # the map over the image in grey (its colours are the map's), opaque where the evidence is and clear
        # where there is none, so the image stays readable under it
        overlay.imshow(seen if grey else seen @ LUMA, interpolation="nearest", cmap="gray", vmin=-255, vmax=255)
        peak = float(smooth[k].max())
        heat = (smooth[k] / peak).numpy() if peak > 0 else np.zeros(smooth[k].shape)
        overlay.imshow(heat, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.75 * heat, extent=extent)
        for ax in (plain, overlay):
            ax.set_axis_off()
        wrong = preds[k] != truth[k]
        title = (
            f"true {_class_name(classes, truth[k])}\n"
            f"{'WRONG: ' if wrong else ''}pred {_class_name(classes, preds[k])} {probs[k]:.0%}"
            + ("" if peak > 0 else "\n(no positive evidence)")
        )
        cell.suptitle(title, fontsize=9, color=WRONG if wrong else "black", fontweight="bold" if wrong else None)
    h, w = found.shape[1:]
    where = f"`{found.name}`" if found.name else "its output"
    fig.suptitle(
        f"Where the model looked: HiResCAM for the predicted class at {where} ({h}x{w} map)\n"
        f"left: the image as the model saw it ({rh}x{rw}); right: its evidence, red = most (per image)",
        fontsize=10,
    )
    return fig
