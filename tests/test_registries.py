"""Registries by name: conf/model and conf/optim options <-> registered builders, unknown names, and a model or
an optimiser added by registration alone (plus its YAML)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cnnpipe.config import ModelConfig, OptimConfig, declared_names, load_config
from cnnpipe.errors import ConfigError
from cnnpipe.models.factory import build_model, model_spec
from cnnpipe.models.layers import Normalize
from cnnpipe.models.registry import model_names, register_model, unregister_model
from cnnpipe.training.optimizers import build_optimizer, optimizer_names, register_optimizer, unregister_optimizer
from tests.helpers import ROOT, names_key
from tests.tiny import conf_section

CONF = ROOT / "conf"
PARAMS = ROOT / "params.yaml"
META = {"image_shape": [1, 4, 4], "classes": ["a", "b", "c"], "mean": [0.5], "std": [0.25]}


def option_names(group: str) -> dict[str, str]:
    """conf/<group>/<option>.yaml -> the `name` it declares."""
    return {p.stem: yaml.safe_load(p.read_text())["name"] for p in sorted((CONF / group).glob("*.yaml"))}


pytestmark = pytest.mark.usefixtures("seeded_one_thread")  # one torch thread: tiny tensors, a busy machine


# --- conf/ and the registries name the same things ----------------------------------------------------------


@pytest.mark.parametrize(("group", "registered"), [("model", model_names), ("optim", optimizer_names)])
def test_every_option_has_a_builder_and_every_builder_an_option(group: str, registered) -> None:
    declared = option_names(group)
    missing = {option: name for option, name in declared.items() if name not in registered()}
    assert not missing, f"conf/{group} options whose name has no registered builder: {missing}"
    unused = set(registered()) - set(declared.values())
    assert not unused, f"registered {group} names no conf/{group}/*.yaml declares: {sorted(unused)}"
    assert declared_names(CONF, group) == registered()  # what config validates against is the registry's set


def test_config_does_not_import_the_registries() -> None:
    """config sits below models/ and training/ (they import it): it reads the names from conf/, never the
    registries, and loads no torch."""
    code = (
        "import sys; from cnnpipe.config import load_config; load_config([], root=__import__('pathlib').Path("
        f"{str(ROOT)!r}));"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('cnnpipe.models', 'cnnpipe.train'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


# --- unknown names: one line naming the key and the known names ---------------------------------------------


@pytest.mark.parametrize(("key", "registered"), [("model.name", model_names), ("optim.name", optimizer_names)])
def test_unknown_name_in_config_is_one_line_naming_the_key(key: str, registered) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([f"{key}=nope"], root=ROOT)
    message = str(err.value)
    assert message == f"{key} must be one of {', '.join(registered())}, got 'nope'"
    assert names_key(message, key)


@pytest.mark.parametrize(("key", "choices"), [("model.name", "[cnn,nope]"), ("optim.name", "[nope,sgd]")])
def test_unknown_name_in_sweep_choices_is_rejected_at_load(key: str, choices: str) -> None:
    """Trials re-validate without the project root, so a bad choice is caught when the config is loaded."""
    overrides = [f"+sweep.space.pick.key={key}", "+sweep.space.pick.type=categorical"]
    with pytest.raises(ConfigError) as err:
        load_config([*overrides, f"+sweep.space.pick.choices={choices}"], root=ROOT)
    assert names_key(str(err.value), "sweep.space.pick.choices") and "'nope'" in str(err.value), str(err.value)
    good = "[cnn,resnet_small]" if key == "model.name" else "[adam,sgd]"
    cfg = load_config([*overrides, f"+sweep.space.pick.choices={good}"], root=ROOT)
    assert cfg.sweep.space["pick"].choices


def test_unknown_name_at_build_time() -> None:
    """A spec or config that skipped the conf/ check (an old models/model.json, a conf/ option with no builder)
    fails with the same line when built."""
    spec = model_spec(replace(conf_section("model"), name="nope"), META)
    with pytest.raises(ConfigError, match=r"^model\.name must be one of .+, got 'nope'$"):
        build_model(spec)
    with pytest.raises(ConfigError, match=r"^optim\.name must be one of .+, got 'nope'$"):
        build_optimizer(nn.Linear(2, 2).parameters(), replace(conf_section("optim"), name="nope"))


# --- adding a model: a registered builder + a YAML --------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, mean: list[float], std: list[float]):
        super().__init__()
        c, h, w = in_shape
        self.normalize = Normalize(mean, std)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.normalize(x))


@pytest.fixture
def tiny_model() -> Iterator[str]:
    @register_model("test_tiny")
    def build_tiny(
        cfg: ModelConfig, *, in_shape: tuple[int, int, int], num_classes: int, mean: list[float], std: list[float]
    ) -> nn.Module:
        return TinyNet(in_shape, num_classes, mean, std)

    yield "test_tiny"
    unregister_model("test_tiny")


def test_registered_model_builds_through_build_model(tiny_model: str) -> None:
    assert tiny_model in model_names()
    net = build_model(model_spec(replace(conf_section("model"), name=tiny_model), META))
    assert isinstance(net, TinyNet)
    assert net(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    assert net.state_dict()["normalize.mean"].flatten().tolist() == [0.5]


def test_registered_model_with_its_yaml_passes_config(tiny_model: str, tmp_path: Path) -> None:
    """conf/model/<new>.yaml is the only config change a new model needs."""
    shutil.copytree(CONF, tmp_path / "conf")
    option = yaml.safe_load((CONF / "model" / "cnn.yaml").read_text()) | {"name": tiny_model}
    (tmp_path / "conf" / "model" / "tiny.yaml").write_text(yaml.safe_dump(option))
    cfg = load_config(["model=tiny"], root=tmp_path, params=PARAMS)
    assert cfg.model.name == tiny_model
    net = build_model(model_spec(cfg.model, META))
    assert net(torch.rand(1, 1, 4, 4)).shape == (1, 3)
    with pytest.raises(ConfigError, match=r"^model\.name must be"):  # ROOT's conf/ declares no such model
        load_config([f"model.name={tiny_model}"], root=ROOT)


def test_registry_cleanup_and_double_registration(tiny_model: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(tiny_model)(lambda cfg, **kw: nn.Identity())
    unregister_model(tiny_model)
    assert tiny_model not in model_names()


# --- optimisers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(option_names("optim")))
def test_optimizer_built_by_name_has_the_configured_values(option: str) -> None:
    values = yaml.safe_load((CONF / "optim" / f"{option}.yaml").read_text())
    cfg = replace(OptimConfig(**values), lr=0.0123, weight_decay=0.0042)
    optimizer = build_optimizer(nn.Linear(3, 2).parameters(), cfg)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.0123, 0.0042)
    if "momentum" in group:  # sgd, rmsprop: the configured momentum; sgd's Nesterov only with momentum
        assert group["momentum"] == cfg.momentum
    if "nesterov" in group:
        assert group["nesterov"] == (cfg.nesterov and cfg.momentum > 0)
        without = build_optimizer(nn.Linear(3, 2).parameters(), replace(cfg, momentum=0.0, nesterov=True))
        assert without.param_groups[0]["nesterov"] is False  # torch refuses Nesterov without momentum


def test_a_builder_registered_under_a_taken_name_registers_none_of_its_names(tiny_model: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("test_fresh_name", tiny_model)(lambda cfg, **kw: nn.Identity())
    assert "test_fresh_name" not in model_names()
    with pytest.raises(ValueError, match="at least one name"):
        register_model()


def test_registered_optimizer_builds_by_name() -> None:
    @register_optimizer("test_plain_sgd")
    def build(params, cfg: OptimConfig) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    try:
        assert "test_plain_sgd" in optimizer_names()
        cfg = replace(conf_section("optim"), name="test_plain_sgd", lr=0.5, weight_decay=0.01)
        optimizer = build_optimizer(nn.Linear(3, 2).parameters(), cfg)
        assert isinstance(optimizer, torch.optim.SGD)
        assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]) == (0.5, 0.01)
    finally:
        unregister_optimizer("test_plain_sgd")
    assert "test_plain_sgd" not in optimizer_names()
