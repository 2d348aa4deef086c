"""Models: every family on every input shape, safetensors round trip, in-model normalisation, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cnnpipe.config import ModelConfig
from cnnpipe.errors import ConfigError, DataError
from cnnpipe.models.factory import build_model, model_spec
from cnnpipe.models.layers import Normalize
from cnnpipe.models.store import SPEC, WEIGHTS, load_model, save_model
from cnnpipe.training.module import ImageClassifier
from tests.helpers import ROOT
from tests.tiny import conf_section

MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))  # every committed conf/model option
SHAPES = ((1, 8, 8), (1, 28, 28), (3, 32, 32))


def model_cfg(name: str) -> ModelConfig:
    """The committed conf/model/<name>.yaml."""
    return conf_section("model", **yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()))


def meta(shape: tuple[int, int, int], num_classes: int = 5) -> dict:
    c = shape[0]
    return {
        "image_shape": list(shape),
        "classes": [f"class_{i}" for i in range(num_classes)],
        "mean": [0.4, 0.5, 0.6][:c],
        "std": [0.2, 0.25, 0.3][:c],
    }


pytestmark = pytest.mark.usefixtures("seeded_one_thread")  # one torch thread: tiny tensors, a busy machine


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS)
def test_logits_shape(name: str, shape: tuple[int, int, int]) -> None:
    net = build_model(model_spec(model_cfg(name), meta(shape, num_classes=7)))
    assert net(torch.rand(3, *shape)).shape == (3, 7)  # train mode (BatchNorm with a batch)
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(1, *shape))
    assert out.shape == (1, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_model_spec_is_plain_json(name: str) -> None:
    spec = model_spec(model_cfg(name), meta((3, 32, 32)))
    assert json.loads(json.dumps(spec)) == spec
    assert spec["model"]["name"] == name
    assert spec["in_shape"] == [3, 32, 32]
    assert len(spec["classes"]) == 5


def test_wider_config_gives_more_parameters() -> None:
    def count(cfg: ModelConfig) -> int:
        return sum(p.numel() for p in build_model(model_spec(cfg, meta((1, 8, 8)))).parameters())

    small = conf_section("model", channels=[8], hidden=[16])
    assert count(conf_section("model", channels=[16], hidden=[16])) > count(small)
    assert count(conf_section("model", channels=[8], hidden=[16], convs_per_block=3)) > count(small)


def test_batch_norm_and_dropout_follow_the_config() -> None:
    plain = build_model(model_spec(model_cfg("cnn"), meta((1, 8, 8))))
    bn = build_model(model_spec(model_cfg("cnn_bn"), meta((1, 8, 8))))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.25 for m in bn.modules())


def test_unknown_model_name() -> None:
    """A spec naming no registered family (an old models/model.json, a conf/ option without a builder)."""
    spec = model_spec(conf_section("model"), meta((1, 8, 8)))
    spec["model"]["name"] = "vgg"
    with pytest.raises(ConfigError, match=r"^model\.name must be one of .*cnn.*, got 'vgg'$"):
        build_model(spec)


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    shape = (3, 32, 32) if name == "resnet_small" else (1, 8, 8)
    spec = model_spec(model_cfg(name), meta(shape))
    net = build_model(spec)
    net.train()
    with torch.no_grad():
        net(torch.rand(8, *shape))  # BatchNorm running statistics away from their initial values
    net.eval()
    x = torch.rand(4, *shape)
    with torch.no_grad():
        expected = net(x)

    save_model(tmp_path, net, spec)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS, SPEC}
    assert json.loads((tmp_path / SPEC).read_text()) == spec
    weights = load_file(str(tmp_path / WEIGHTS))
    assert set(weights) == set(net.state_dict())

    loaded, loaded_spec = load_model(tmp_path)
    assert loaded_spec == spec
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_model_without_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path)):
        load_model(tmp_path)


def test_normalize_buffers() -> None:
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
    assert {name for name, _ in norm.named_buffers()} == {"mean", "std"}
    assert list(norm.parameters()) == []
    assert set(norm.state_dict()) == {"mean", "std"}
    assert norm.mean.shape == norm.std.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)
    assert norm.double().mean.dtype == torch.float64  # buffers move with the module


@pytest.mark.parametrize("name", MODELS)
def test_model_carries_the_measured_mean_and_std(name: str) -> None:
    """cnnpipe's own families normalise with the training split's statistics; a pretrained timm network with its
    pretraining's (the architecture's pretrained config), which is what its weights expect."""
    net = build_model(model_spec(model_cfg(name), meta((3, 32, 32))))
    state = net.state_dict()
    mean, std = (
        ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3]) if name != "timm" else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    )
    assert state["normalize.mean"].flatten().tolist() == pytest.approx(mean)
    assert state["normalize.std"].flatten().tolist() == pytest.approx(std)
    assert "normalize.mean" not in dict(net.named_parameters())


def accuracy(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        acc = (module(x).argmax(1) == y).float().mean().item()
    module.train()
    return acc


@pytest.mark.parametrize("name", ["cnn", "resnet_small"])
def test_tiny_overfit(name: str) -> None:
    """Up to a few hundred steps on 20 random images memorise them: model, loss and optimiser learn."""
    x = torch.rand(20, 1, 8, 8)
    y = torch.arange(20) % 4
    cfg = conf_section(
        "model",
        name=name,
        channels=[16, 32],
        convs_per_block=1,
        hidden=[64] if name == "cnn" else [],
        batch_norm=name != "cnn",
    )
    net = build_model(model_spec(cfg, meta((1, 8, 8), num_classes=4)))
    module = ImageClassifier(net, 4, conf_section("optim", name="adam", lr=0.002, weight_decay=0.0, scheduler="none"))
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert accuracy(module, x, y) < 1.0
    with torch.no_grad():
        first_loss = module._loss(module(x), y).item()
    acc, step = 0.0, 0
    while acc < 1.0 and step < 300:  # stop once memorised: long runs only slow the test down
        for _ in range(10):
            optimizer.zero_grad()
            loss = module._loss(module(x), y)
            loss.backward()
            optimizer.step()
        step += 10
        acc = accuracy(module, x, y)
    assert acc == 1.0, f"training accuracy {acc} after {step} steps (loss {loss.item():.3f})"
    assert loss.item() < first_loss
