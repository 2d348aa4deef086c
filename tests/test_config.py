"""Config: Hydra composition of conf/, params.yaml + overrides, schema and value validation."""

from __future__ import annotations

import copy
import re
import shutil
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from cnnpipe.config import (
    Config,
    ParamSpace,
    as_dict,
    compose,
    find_project_root,
    flatten,
    load_config,
    to_config,
)
from cnnpipe.errors import ConfigError
from tests.helpers import ROOT, names_key

CONF = ROOT / "conf"
PARAMS = ROOT / "params.yaml"


def committed_params() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def assert_holds(tree: dict, full: dict) -> None:
    """Every leaf of `tree` has the same value in `full` (the schema may add defaults beside them)."""
    flat_full = flatten(full)
    for key, value in flatten(tree).items():
        assert key in flat_full, key
        assert flat_full[key] == value, key


def write_params(tmp_path: Path, **changes: dict) -> Path:
    """A copy of the committed params.yaml with some groups updated (shallow per group)."""
    raw = committed_params()
    for group, values in changes.items():
        if isinstance(values, dict):
            raw[group] = {**raw[group], **values}
        else:
            raw[group] = values
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- composition --------------------------------------------------------------------------------


def test_compose_of_conf_equals_committed_params() -> None:
    assert compose(conf_dir=CONF) == committed_params()


def test_committed_params_round_trip_through_the_schema() -> None:
    cfg = load_config(root=ROOT)
    assert isinstance(cfg, Config)
    params = committed_params()
    assert set(as_dict(cfg)) == set(params)
    assert_holds(params, as_dict(cfg))
    assert as_dict(to_config(as_dict(cfg))) == as_dict(cfg)


def test_compose_applies_overrides() -> None:
    composed = compose(["optim=sgd", "optim.lr=0.2", "model=resnet_small"], conf_dir=CONF)
    assert composed["optim"]["name"] == "sgd"
    assert composed["optim"]["lr"] == 0.2
    assert composed["optim"]["nesterov"] is True  # from conf/optim/sgd.yaml
    assert composed["model"]["name"] == "resnet_small"
    assert composed["model"]["hidden"] == []


def test_compose_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nope"):
        compose(["model=nope"], conf_dir=CONF)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim=sgd", "optim.lr=0.1"],
        ["model=resnet_small"],
        ["data=mnist5k", "data.batch_size=32"],
        ["augment=none", "seed=7"],
        ["model=cnn_bn", "model.channels=[8,16]", "optim=rmsprop"],
    ],
)
def test_load_config_agrees_with_compose(overrides: list[str]) -> None:
    """Overrides on params.yaml give the same config as composing conf/ with them (what DVC does)."""
    assert as_dict(load_config(overrides, root=ROOT)) == as_dict(to_config(compose(overrides, conf_dir=CONF)))


@pytest.mark.parametrize("group", sorted(p.name for p in CONF.iterdir() if p.is_dir()))
def test_every_group_option_is_valid(group: str) -> None:
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        overrides = [f"{group}={option}"]
        expected = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
        expected.pop("defaults", None)  # an option extending another (trainer/ddp) states only what differs
        if expected.get("path") == "???":
            overrides.append(f"{group}.path=/some/folder")
            expected["path"] = "/some/folder"
        cfg = load_config(overrides, root=ROOT)
        assert_holds(expected, as_dict(cfg)[group])
        assert_holds(as_dict(cfg)[group], as_dict(to_config(compose(overrides, conf_dir=CONF)))[group])


def test_find_project_root(tmp_path: Path) -> None:
    assert find_project_root(ROOT / "src" / "cnnpipe") == ROOT
    with pytest.raises(ConfigError, match=re.escape("conf/config.yaml")):
        find_project_root(tmp_path)


# --- overrides ----------------------------------------------------------------------------------


def test_key_override_sets_one_value() -> None:
    base = load_config(root=ROOT)
    cfg = load_config(["optim.lr=0.01"], root=ROOT)
    assert cfg.optim.lr == pytest.approx(0.01)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == base.optim.name
    assert as_dict(cfg)["model"] == as_dict(base)["model"]


def test_group_override_swaps_the_whole_group() -> None:
    cfg = load_config(["model=cnn_bn"], root=ROOT)
    expected = yaml.safe_load((CONF / "model" / "cnn_bn.yaml").read_text())
    assert as_dict(cfg)["model"] == expected
    assert cfg.model.batch_norm is True
    assert cfg.model.dropout == pytest.approx(0.25)


def test_group_then_key_override() -> None:
    cfg = load_config(["optim=sgd", "optim.lr=0.1"], root=ROOT)
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == pytest.approx(0.1)
    assert cfg.optim.nesterov is True


def test_split_overrides_that_sum_to_one() -> None:
    cfg = load_config(["data.split.train=0.8", "data.split.test=0.1"], root=ROOT)
    assert (cfg.data.split.train, cfg.data.split.val, cfg.data.split.test) == pytest.approx((0.8, 0.1, 0.1))


def test_list_and_null_overrides() -> None:
    cfg = load_config(["model.channels=[16,32,64]", "model.hidden=[]", "tracking.experiment=null"], root=ROOT)
    assert cfg.model.channels == [16, 32, 64]
    assert cfg.model.hidden == []
    assert cfg.tracking.experiment is None


def test_imagefolder_with_a_path(tmp_path: Path) -> None:
    cfg = load_config(["data=imagefolder", f"data.path={tmp_path}"], root=ROOT)
    assert cfg.data.name == "imagefolder"
    assert cfg.data.path == str(tmp_path)
    assert cfg.data.channels == 3


def test_load_config_from_a_different_params_file(tmp_path: Path) -> None:
    params = write_params(tmp_path, optim={"lr": 0.5, "name": "sgd"}, seed=3)
    cfg = load_config(root=ROOT, params=params)
    assert (cfg.optim.name, cfg.optim.lr, cfg.seed) == ("sgd", 0.5, 3)
    cfg = load_config(["optim.lr=0.25"], root=ROOT, params=params)
    assert cfg.optim.lr == pytest.approx(0.25)


def test_params_with_missing_keys_is_an_error_naming_them(tmp_path: Path) -> None:
    """Was: the schema's own defaults silently filled the gaps (model.channels [32, 64], not conf/'s [16, 32])."""
    params = tmp_path / "params.yaml"
    params.write_text("seed: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(root=ROOT, params=params)
    message = str(err.value)
    assert "\n" not in message and str(params) in message and "make params" in message
    for section in ("data", "model", "optim", "train"):
        assert names_key(message, section), message


def test_bad_params_in_file_names_the_key(tmp_path: Path) -> None:
    params = write_params(tmp_path, train={"epochs": -3})
    with pytest.raises(ConfigError) as err:
        load_config(root=ROOT, params=params)
    assert names_key(str(err.value), "train.epochs")


def test_unreadable_params_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(root=ROOT, params=missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        load_config(root=ROOT, params=bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(root=ROOT, params=scalar)


def test_root_with_its_own_conf(tmp_path: Path) -> None:
    """`root` picks the conf/ folder that group overrides read."""
    shutil.copytree(CONF, tmp_path / "conf")
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    (tmp_path / "conf" / "optim" / "fast.yaml").write_text(
        "name: sgd\nlr: 0.9\nweight_decay: 0.0\nmomentum: 0.5\nnesterov: false\nscheduler: none\nbackbone_lr: 1.0\n"
        "decay_norm_bias: false\n"
    )
    cfg = load_config(["optim=fast"], root=tmp_path)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.scheduler) == ("sgd", 0.9, "none")
    with pytest.raises(ConfigError, match="fast"):
        load_config(["optim=fast"], root=ROOT)


# --- validation ---------------------------------------------------------------------------------

REJECTED = [
    (["seed=-1"], "seed"),
    (["train.ema=0.9", "trainer.precision=bf16-true"], "trainer.precision"),
    (["train.ema=1.0"], "train.ema"),
    (["train.accumulate=0"], "train.accumulate"),
    (["train.class_balance=oversample"], "train.class_balance"),
    (["data.dedupe=true"], "data.dedupe"),
    (["data.dedupe=all"], "data.dedupe"),
    (["data.near_duplicate_bits=17"], "data.near_duplicate_bits"),
    (["data.near_duplicate_bits=-1"], "data.near_duplicate_bits"),
    (["optim.backbone_lr=0"], "optim.backbone_lr"),
    (["optim.backbone_lr=2"], "optim.backbone_lr"),
    (["augment.online.policy=autoaugment"], "augment.online.policy"),
    (["augment.online.crop_scale=[0.5,0.1]"], "augment.online.crop_scale"),
    (["augment.online.mixup=-1"], "augment.online.mixup"),
    (["data.name=cifar"], "data.name"),
    (["data=imagefolder"], "data.path"),
    (["data=mnist_idx"], "data.path"),
    (["data.name=imagefolder"], "data.path"),
    (["data.channels=2"], "data.channels"),
    (["data.image_size=3"], "data.image_size"),
    (["data.image_size=2048"], "data.image_size"),
    (["data.split.train=0"], "data.split.train"),
    (["data.split.val=1"], "data.split.val"),
    (["data.split.test=-0.1"], "data.split.test"),
    (["data.split.train=0.8"], "data.split"),
    (["data.split.train=0.5"], "data.split"),
    (["data.batch_size=0"], "data.batch_size"),
    (["augment.copies=-1"], "augment.copies"),
    (["augment.copies=101"], "augment.copies"),
    (["augment.rotate=181"], "augment.rotate"),
    (["augment.rotate=-1"], "augment.rotate"),
    (["augment.translate=1"], "augment.translate"),
    (["augment.scale=[1.2,1.1]"], "augment.scale"),
    (["augment.scale=[0,1]"], "augment.scale"),
    (["augment.scale=[1]"], "augment.scale"),
    (["augment.brightness=2"], "augment.brightness"),
    (["augment.contrast=-0.1"], "augment.contrast"),
    (["augment.noise_std=1.5"], "augment.noise_std"),
    (["augment.erase_prob=1.5"], "augment.erase_prob"),
    (["augment.erase_area=[0.5,0.1]"], "augment.erase_area"),
    (["augment.erase_area=[0,0.1]"], "augment.erase_area"),
    (["augment.erase_area=[0.1,1]"], "augment.erase_area"),
    (["augment.preview=-1"], "augment.preview"),
    (["model.name=vgg"], "model.name"),
    (["model.channels=[]"], "model.channels"),
    (["model.channels=[0,8]"], "model.channels"),
    (["model.convs_per_block=0"], "model.convs_per_block"),
    (["model.hidden=[0]"], "model.hidden"),
    (["model.dropout=1"], "model.dropout"),
    (["optim.name=lbfgs"], "optim.name"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim.momentum=1"], "optim.momentum"),
    (["optim.scheduler=step"], "optim.scheduler"),
    (["train.epochs=0"], "train.epochs"),
    (["train.hparams=grid"], "train.hparams"),
    (["train.label_smoothing=1"], "train.label_smoothing"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["train.monitor=val/top5"], "train.monitor"),
    (["train.monitor_mode=up"], "train.monitor_mode"),
    (["train.early_stopping_patience=-1"], "train.early_stopping_patience"),
    (["trainer.accelerator=tpu"], "trainer.accelerator"),
    (["trainer.devices=0"], "trainer.devices"),
    (["trainer.num_nodes=0"], "trainer.num_nodes"),
    (["trainer.precision=8"], "trainer.precision"),
    (["trainer.threads=-1"], "trainer.threads"),
    (["sweep.n_trials=0"], "sweep.n_trials"),
    (["sweep.sampler=grid"], "sweep.sampler"),
    (["sweep.direction=up"], "sweep.direction"),
    (["sweep.workers=0"], "sweep.workers"),
    (["sweep.space.lr.key=optim.nope"], "sweep.space.lr.key"),
    (["sweep.space.lr.low=-1"], "sweep.space.lr.low"),
    # schema: unknown keys, wrong types, unknown group options
    (["optim.foo=1"], "optim.foo"),
    (["+optim.foo=1"], "optim.foo"),
    (["foo=1"], "foo"),
    (["optim.lr=abc"], "optim.lr"),
    (["data.batch_size=1.5"], "data.batch_size"),
    (["train.epochs=true"], "train.epochs"),
    (["model=nope"], "model"),
    (["optim=nope"], "optim"),
    (["~optim.lr"], "optim.lr"),
]


@pytest.mark.parametrize(("overrides", "key"), REJECTED, ids=[" ".join(o) for o, _ in REJECTED])
def test_invalid_values_are_rejected_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides, root=ROOT)
    assert names_key(str(err.value), key), str(err.value)


def test_unknown_group_option_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(["model=nope"], root=ROOT)
    assert "nope" in str(err.value)
    for option in (p.stem for p in (CONF / "model").glob("*.yaml")):
        assert option in str(err.value)


def test_malformed_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config(["optim.lr=[1,"], root=ROOT)


def test_to_config_needs_every_key_and_validates() -> None:
    with pytest.raises(ConfigError) as err:
        to_config({})
    assert names_key(str(err.value), "seed")
    raw = committed_params()
    assert_holds(raw, as_dict(to_config(raw)))
    with pytest.raises(ConfigError) as err:
        to_config(raw | {"optim": raw["optim"] | {"lr": -1}})
    assert names_key(str(err.value), "optim.lr")
    with pytest.raises(ConfigError) as err:
        to_config(raw | {"data": raw["data"] | {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}})
    assert names_key(str(err.value), "data.split")


def test_override_order_does_not_matter() -> None:
    overrides = ["optim.lr=0.1", "optim=sgd"]
    assert compose(overrides, conf_dir=CONF)["optim"]["lr"] == 0.1  # Hydra's semantics
    cfg = load_config(overrides, root=ROOT)
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == pytest.approx(0.1)


def test_scalar_for_a_mapping_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(["data.split=0.5"], root=ROOT)
    assert names_key(str(err.value), "data.split"), str(err.value)


# --- flatten ------------------------------------------------------------------------------------


def test_flatten_produces_dotted_keys() -> None:
    tree = {"optim": {"lr": 0.1, "name": "sgd"}, "data": {"split": {"train": 0.7}}, "seed": 1, "e": {}}
    assert flatten(tree) == {"optim.lr": 0.1, "optim.name": "sgd", "data.split.train": 0.7, "seed": 1}


def test_flatten_keeps_lists_as_values_and_every_leaf() -> None:
    flat = flatten(as_dict(load_config(root=ROOT)))
    committed = committed_params()
    assert flat["model.channels"] == committed["model"]["channels"] and isinstance(flat["model.channels"], list)
    assert flat["data.split.train"] == pytest.approx(committed["data"]["split"]["train"])
    assert flat["optim.lr"] == pytest.approx(committed["optim"]["lr"])
    assert all(not isinstance(v, dict) for v in flat.values())

    def leaves(tree: dict) -> int:
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in tree.values())

    assert len(flat) == leaves(as_dict(load_config(root=ROOT)))
    assert set(flatten(committed_params())) <= set(flat)


# --- one source of defaults (issue #15, item 3) ---------------------------------------------------


def schema_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema holds: the leaves, and each section (a dict such as sweep.space is a leaf)."""
    keys: list[str] = []
    hints = get_type_hints(schema)
    for f in fields(schema):
        keys.append(f"{prefix}{f.name}")
        if is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def schema_dataclasses(schema: type = Config) -> set[type]:
    found = {schema}
    for kind in get_type_hints(schema).values():
        for candidate in (kind, *getattr(kind, "__args__", ())):
            if isinstance(candidate, type) and is_dataclass(candidate):
                found |= schema_dataclasses(candidate)
    return found


def space_keys(raw: dict) -> list[str]:
    """The required keys of each committed sweep.space entry (ParamSpace's `key` and `type`)."""
    required = [f.name for f in fields(ParamSpace) if f.default is MISSING]
    return [f"sweep.space.{name}.{key}" for name in raw["sweep"]["space"] for key in required]


def drop(tree: dict, key: str) -> dict:
    """A deep copy of `tree` without the dotted `key`."""
    tree = copy.deepcopy(tree)
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node[part]
    del node[last]
    return tree


def test_the_schema_holds_no_values() -> None:
    """conf/ is the one source of values: no schema field has a default, so none can disagree with conf/ (they
    did: model.channels [32, 64] vs [16, 32], model.hidden [128] vs [64], train.hparams params vs sweep). Only a
    sweep.space entry's optional fields have one: not given."""
    with_defaults = {
        f"{schema.__name__}.{f.name}"
        for schema in schema_dataclasses()
        for f in fields(schema)
        if f.default is not MISSING or f.default_factory is not MISSING
    }
    assert with_defaults == {f"ParamSpace.{name}" for name in ("low", "high", "log", "step", "choices")}


def test_every_schema_key_is_in_the_composition_of_conf() -> None:
    stated = set(flatten(compose(conf_dir=CONF)))
    stated |= {key.rsplit(".", i)[0] for key in stated for i in range(1, key.count(".") + 1)}  # the sections
    assert {key for key in stated if not key.startswith("sweep.space.")} == set(schema_keys())


KEYS = sorted(set(schema_keys()) | set(space_keys(yaml.safe_load(PARAMS.read_text()))))


@pytest.mark.parametrize("key", KEYS)
def test_a_key_missing_from_params_is_an_error_naming_it(tmp_path: Path, key: str) -> None:
    """Was: the schema's default stood in silently for any key left out of params.yaml."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(drop(committed_params(), key), sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_config(root=ROOT, params=params)
    message = str(err.value)
    assert names_key(message, key) and str(params) in message and "\n" not in message, message


def test_ddp_states_only_what_differs_from_the_default_trainer() -> None:
    default = yaml.safe_load((CONF / "trainer" / "default.yaml").read_text())
    ddp = yaml.safe_load((CONF / "trainer" / "ddp.yaml").read_text())
    assert ddp.pop("defaults") == ["default", "_self_"]
    assert ddp and all(default[key] != value for key, value in ddp.items()), ddp
    composed = compose(["trainer=ddp"], conf_dir=CONF)
    assert composed["trainer"] == default | ddp
    assert composed == compose(conf_dir=CONF) | {"trainer": default | ddp}
    # The composition is what it was when ddp.yaml stated every key.
    assert composed["trainer"] == {
        "accelerator": "auto",
        "devices": 2,
        "num_nodes": 1,
        "strategy": "ddp",
        "precision": "auto",
        "threads": 0,
        "scale_lr": "none",
        "channels_last": "auto",
        "compile": False,
        "steps_per_call": 8,
    }
    # Stage entries apply `trainer=ddp` to params.yaml the same way (Hydra composes the extending option).
    assert as_dict(load_config(["trainer=ddp"], root=ROOT))["trainer"] == composed["trainer"]
    cfg = load_config(["trainer.devices=4", "trainer=ddp", "trainer.accelerator=cpu"], root=ROOT)
    assert (cfg.trainer.devices, cfg.trainer.strategy, cfg.trainer.accelerator) == (4, "ddp", "cpu")
