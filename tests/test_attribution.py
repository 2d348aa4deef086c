"""Class-activation maps (evaluation/attribution.py): the layer found for cnnpipe's and timm's networks, the maps
pointing where a logit's evidence is, the picture, and the one line for networks the method does not fit."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib.text
import pytest
import torch
from PIL import Image
from torch import nn

import cnnpipe.evaluation.attribution as attribution
from cnnpipe.evaluation.attribution import (
    NOT_APPLICABLE,
    FeatureMap,
    class_activation_maps,
    class_sample,
    find_feature_map,
    plot_class_activation_maps,
)
from cnnpipe.evaluation.metrics import predict_logits
from cnnpipe.models.factory import build_model
from tests.tiny import conf_section

CLASSES = ["cat", "dog", "eel $x"]


def spec(name: str, stored: int, size: int, rgb: bool = False, **model: Any) -> dict[str, Any]:
    """A model spec for images stored at `stored` px whose network takes the central `size` px (prepare's record)."""
    channels = 3 if rgb else 1
    return {
        "model": asdict(conf_section("model", name=name, **model)),
        "in_shape": [channels, stored, stored],
        "classes": CLASSES,
        "mean": [0.4] * channels,
        "std": [0.3] * channels,
        "input_size": size,
        "interpolation": "bilinear",
        "crop_pct": size / stored,
    }


def tiny_images(n: int, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n) % len(CLASSES)


class Drawn:
    """What the plot wrote: the real save_png, with the figure's axes and texts kept for the test to read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.axes = 0
        self.texts: list[str] = []
        save = attribution.save_png

        def keep(fig: Any, path: Path, **options: Any) -> None:
            self.axes = len(fig.get_axes())
            self.texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
            save(fig, path, **options)

        monkeypatch.setattr(attribution, "save_png", keep)


def test_the_sample_takes_each_class_in_turn_and_is_the_same_every_time() -> None:
    labels = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    assert class_sample(labels, 5) == [1, 3, 0, 2, 5]  # each class's first, then each class's second...
    assert class_sample(labels, 100) == [1, 3, 0, 2, 5, 4, 6]
    assert class_sample(torch.tensor([], dtype=torch.int64), 4) == []


class LeftHalf(nn.Module):
    """Class 1's logit reads only the left half of an 8x8 image's map (a weight per position, as cnnpipe's `cnn`
    flattens its map); class 0's is a constant below it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        with torch.no_grad():
            self.features[0].weight.fill_(1.0)
            self.features[0].bias.zero_()
            self.head[1].weight.zero_()
            self.head[1].weight[1].view(8, 8)[:, :4] = 1.0
            self.head[1].bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_the_map_puts_the_evidence_where_the_logit_looks(one_thread: None) -> None:
    from captum.attr import LayerGradCam

    net = LeftHalf().eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    found = find_feature_map(net, x[:1])
    assert isinstance(found, FeatureMap) and found.name == "features" and found.shape == (1, 8, 8)
    assert net(x).argmax(dim=1).tolist() == [1, 1, 1, 1]
    maps = class_activation_maps(net, x, found.module, torch.ones(4, dtype=torch.int64))
    assert maps.shape == (4, 8, 8)
    assert (maps[..., :4] > 0).all() and (maps[..., 4:] == 0).all()
    # the first-order decomposition: the positions' shares add up to the logit (its bias is 0)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), net(x)[:, 1].detach())
    # why not Grad-CAM: averaging the gradient over positions puts evidence on the half the logit never reads
    gradcam = LayerGradCam(net, found.module).attribute(x, target=1, relu_attributions=True)
    assert (gradcam[..., 4:] > 0).all()


def test_the_crop_the_network_takes_inside_is_what_is_shown(one_thread: None) -> None:
    torch.manual_seed(0)
    net = build_model(spec("cnn", stored=10, size=8, channels=[4], convs_per_block=1, hidden=[8])).eval()
    images, _ = tiny_images(2, 1, 10)
    found = find_feature_map(net, images.float() / 255)
    assert isinstance(found, FeatureMap) and found.seen == (8, 8) and found.shape == (4, 4, 4)


NETWORKS = {
    # three pooling blocks take 8x8 digits to 1x1: the last 2x2 map (block 3's activation, before its pool)
    "cnn": (spec("cnn", 8, 8, channels=[4, 4, 4], convs_per_block=1, hidden=[8]), "features.7", (2, 2)),
    "resnet_small": (spec("resnet_small", 8, 8, channels=[4, 8], convs_per_block=1, hidden=[]), "stages", (4, 4)),
    "timm test_resnet": (spec("timm", 72, 64, rgb=True, arch="test_resnet"), "net.layer4", (2, 2)),
    "timm test_efficientnet": (spec("timm", 72, 64, rgb=True, arch="test_efficientnet"), "net.bn2", (2, 2)),
}


@pytest.mark.parametrize("case", NETWORKS, ids=list(NETWORKS))
def test_convolutional_networks_get_a_picture(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeded_one_thread: None
) -> None:
    model_spec, layer, size = NETWORKS[case]
    net = build_model(model_spec).train()
    for p in net.parameters():
        p.requires_grad_(False)  # frozen, as a fine-tuning recipe leaves a backbone: the maps need none
    c, stored = model_spec["in_shape"][0], model_spec["in_shape"][1]
    images, labels = tiny_images(7, c, stored)
    found = find_feature_map(net.eval(), images[:1].float() / 255)
    assert isinstance(found, FeatureMap), found
    assert (found.name, found.shape[1:], found.seen) == (layer, size, (model_spec["input_size"],) * 2)
    net.train()
    drawn = Drawn(monkeypatch)
    path = tmp_path / "cam.png"
    assert plot_class_activation_maps(net, images, labels, CLASSES, path, count=5) is None
    assert path.is_file() and drawn.axes == 2 * 5  # the image and its map, per sample
    assert all(m.training for m in net.modules()), "the network's train/eval flags are restored"
    assert not any(p.requires_grad for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules()), "hooks are removed"


def test_titles_name_the_classes_and_mark_the_wrong_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeded_one_thread: None
) -> None:
    net = build_model(spec("cnn", 8, 8, channels=[4], convs_per_block=1, hidden=[8]))
    images, labels = tiny_images(9, 1, 8)
    drawn = Drawn(monkeypatch)
    assert plot_class_activation_maps(net, images, labels, CLASSES, tmp_path / "cam.png", count=6) is None
    picked = class_sample(labels, 6)
    preds = predict_logits(net, images[picked]).argmax(dim=1)
    titles = [t for t in drawn.texts if t.startswith("true ")]
    assert len(titles) == 6
    for title, truth, pred in zip(titles, labels[picked].tolist(), preds.tolist(), strict=True):
        assert title.startswith(f"true {CLASSES[truth]}".replace("$", r"\$"))
        assert f"pred {CLASSES[pred]}".replace("$", r"\$") in title
        assert ("WRONG" in title) == (truth != pred)


def test_picture_sizes_suit_digits_and_photos(tmp_path: Path, seeded_one_thread: None) -> None:
    """8x8 digits are blown up (an image pixel is many screen pixels), 224-px photos are not shown larger than
    they are: a panel is between ~140 and ~230 pixels either way."""
    widths = {}
    for stored, size, channels in ((8, 8, 1), (235, 224, 3)):
        name = "cnn" if size == 8 else "timm"
        extra = {"arch": "test_resnet"} if name == "timm" else {"channels": [4], "convs_per_block": 1, "hidden": [8]}
        net = build_model(spec(name, stored, size, rgb=channels == 3, **extra))
        images, labels = tiny_images(8, channels, stored)
        path = tmp_path / f"{size}.png"
        assert plot_class_activation_maps(net, images, labels, CLASSES, path, count=8) is None
        width, height = Image.open(path).size
        widths[size] = width / 8  # four pairs a row
        assert height < width
    assert 140 <= widths[8] <= 230 and 140 <= widths[224] <= 230, widths


class Tokens(nn.Module):
    """A ViT's shape of computation: a strided convolution cuts patches, then everything is tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.patches(x).flatten(2).transpose(1, 2)).mean(dim=1))


NOT_CONVOLUTIONAL = {
    "timm test_vit": (lambda: build_model(spec("timm", 32, 32, rgb=True, arch="test_vit")), 3, "tokens (N, L, D)"),
    "patches then tokens": (Tokens, 3, "Tokens's last features are tokens (N, L, D) = (1, 64, 8) at `mix`"),
    "no convolution": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), 1, "Sequential has no convolutional"),
}


@pytest.mark.parametrize("case", NOT_CONVOLUTIONAL, ids=list(NOT_CONVOLUTIONAL))
def test_networks_without_a_convolutional_map_get_one_line_and_no_picture(
    case: str, tmp_path: Path, seeded_one_thread: None
) -> None:
    make, channels, says = NOT_CONVOLUTIONAL[case]
    net = make()
    images, labels = tiny_images(4, channels, 32 if channels == 3 else 8)
    path = tmp_path / "cam.png"
    path.write_bytes(b"a picture of an earlier run")
    why = plot_class_activation_maps(net, images, labels, CLASSES, path)
    assert isinstance(why, str) and why.startswith(NOT_APPLICABLE) and says in why and "\n" not in why
    assert not path.exists(), "a stale picture is removed"
