"""Typed configuration: compose `conf/` with Hydra, load `params.yaml`, apply overrides, validate.

DVC reads `params.yaml` (the composition of `conf/`), so stage entries start from it and apply
Hydra-syntax overrides on top: `optim.lr=0.01` sets a key, `model=cnn_bn` swaps a whole group for
`conf/model/cnn_bn.yaml`. This module is the only one that knows Hydra's compose API.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from cnnpipe.errors import ConfigError

DATA_SOURCES = ("digits", "mnist5k", "imagefolder", "mnist_idx")
# Groups whose `name` picks a builder from a registry above this module: model.name (models/registry.py) and
# optim.name (training/optimizers.py). The names a project accepts are those its conf/<group>/*.yaml declare.
NAMED_GROUPS = ("model", "optim")
SCHEDULERS = ("onecycle", "cosine", "none")
MONITORS = ("val/acc", "val/loss", "val/f1_macro")
TEST_METRICS = ("acc", "f1_macro", "precision_macro", "recall_macro", "ece", "loss")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed")
SAMPLERS = ("tpe", "random", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "none")
PARAM_TYPES = ("float", "int", "categorical")
PRECISIONS = ("auto", "32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
POLICIES = ("none", "randaugment", "trivialaugment")
PRETRAINED_FAMILIES = ("timm",)  # model.name values that take model.arch / pretrained / weights
_ABSENT = object()  # a key a mapping does not have (None is a value)
OUTPUT_PATHS = ("prepared", "augmented", "models", "eval", "checkpoints", "sweep", "optuna")
SOURCE_FOLDERS = (".git", ".dvc", "src", "conf", "pipelines", "tests")  # no output path may lie in these


# The schema holds types and checks only: conf/ is the one source of values. A field here has no default, so a
# key absent from params.yaml (or from a composition) is an error naming it, never a silent stand-in value.
# The one exception is a sweep.space entry (ParamSpace), written by hand per searched key: what it leaves out
# (low/high/log/step/choices) means "not given", as its checks require.


@dataclass
class SplitConfig:
    train: float
    val: float
    test: float


@dataclass
class DataConfig:
    name: str
    path: str | None
    channels: int
    image_size: int | None  # the network's input size; None: the model's own (data/preprocess.py)
    split: SplitConfig
    batch_size: int
    on_device: str
    workers: int
    dedupe: str  # none | exact | near: drop val/test images that duplicate an earlier split's (data/checks.py)
    near_duplicate_bits: int  # perceptual hashes this many bits apart or fewer are near duplicates


@dataclass
class OnlineAugmentConfig:
    """Drawn afresh for every training batch, per image, on the training device (kornia, timm's Mixup)."""

    crop_scale: list[float] | None
    hflip: bool
    policy: str
    mixup: float
    cutmix: float


@dataclass
class AugmentConfig:
    copies: int
    rotate: float
    translate: float
    scale: list[float]
    hflip: bool
    brightness: float
    contrast: float
    noise_std: float
    erase_prob: float
    erase_area: list[float]
    preview: int
    online: OnlineAugmentConfig


@dataclass
class ModelConfig:
    name: str
    channels: list[int]
    convs_per_block: int
    hidden: list[int]
    dropout: float
    batch_norm: bool
    init_from: str | None
    freeze_epochs: int
    arch: str | None
    pretrained: bool
    weights: str | None
    mean: list[float] | None
    std: list[float] | None
    interpolation: str | None
    crop_pct: float | None


@dataclass
class OptimConfig:
    name: str
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    scheduler: str
    backbone_lr: float
    decay_norm_bias: bool


@dataclass
class TrainConfig:
    epochs: int
    hparams: str
    label_smoothing: float
    grad_clip: float
    monitor: str
    monitor_mode: str
    early_stopping_patience: int
    deterministic: bool
    resume: str
    ema: float
    accumulate: int
    class_balance: str  # none | loss (class-weighted cross-entropy) | sampler (class-balanced batches)


@dataclass
class TrainerConfig:
    accelerator: str
    devices: int
    num_nodes: int
    strategy: str
    precision: str
    threads: int
    scale_lr: str
    channels_last: str
    compile: bool
    steps_per_call: int


@dataclass
class TrackingConfig:
    uri: str | None
    experiment: str | None
    log_model: bool
    register: bool
    registered_model: str | None
    champion_metric: str
    champion_mode: str


@dataclass
class ParamSpace:
    """One searchable key: `float` / `int` between low and high (log scale optional, step for int),
    or `categorical` over choices. `key` and `type` are required; the rest, when left out, is not given."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


@dataclass
class SweepConfig:
    study_name: str | None
    n_trials: int
    timeout: float | None
    metric: str
    direction: str
    sampler: str
    pruner: str
    prune_on: str
    n_startup_trials: int
    pruner_startup_trials: int
    n_warmup_epochs: int
    storage: str | None
    workers: int
    space: dict[str, ParamSpace]


@dataclass
class PathsConfig:
    prepared: str
    augmented: str
    models: str
    eval: str
    checkpoints: str
    sweep: str
    optuna: str
    allow_outside: bool


@dataclass
class Config:
    seed: int
    data: DataConfig
    augment: AugmentConfig
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    trainer: TrainerConfig
    tracking: TrackingConfig
    sweep: SweepConfig
    paths: PathsConfig


def find_project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` holding conf/config.yaml (where DVC runs the stages)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "conf" / "config.yaml").is_file():
            return folder
    raise ConfigError(f"no cnnpipe project (conf/config.yaml) at or above {here}")


def store_root(project_root: Path) -> Path:
    """The folder that holds the store. DVC runs queued experiments in temporary copies of the repo
    (`.dvc/tmp/exps/...`): their runs belong in the original project's store, not the copy's."""
    root = project_root.resolve()
    parts = root.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def compose(overrides: list[str] | None = None, conf_dir: Path | None = None) -> dict[str, Any]:
    """Compose `conf/` with Hydra, as `dvc exp run -S` does when it writes params.yaml."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    conf_dir = (conf_dir or find_project_root() / "conf").resolve()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as exc:
        raise ConfigError(f"{conf_dir}: {_first_line(str(exc))}") from None
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def read_params(params: Path) -> dict[str, Any]:
    """params.yaml as a mapping; an unreadable, invalid, empty or non-mapping file is one line naming it."""
    try:
        raw = yaml.safe_load(params.read_text())
    except OSError as exc:
        raise ConfigError(f"{params}: cannot read: {exc.strerror or _first_line(str(exc))}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or _first_line(str(exc))
        raise ConfigError(f"{params}: not valid YAML: {where}{problem}") from None
    if raw is None or raw == {}:
        raise ConfigError(f"{params}: is empty; expected a mapping of config keys (re-compose it: make params)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{params}: expected a mapping of config keys, got a {type(raw).__name__}")
    return raw


def load_config(overrides: list[str] | None = None, root: Path | None = None, params: Path | None = None) -> Config:
    """params.yaml of the project at `root`, with Hydra-syntax overrides applied, validated."""
    root = root or find_project_root()
    params = params or root / "params.yaml"
    merged = apply_overrides(read_params(params), overrides or [], root / "conf")
    return to_config(merged, source=str(params), root=root)


def explicit_keys(overrides: list[str], root: Path, params: Path | None = None) -> frozenset[str]:
    """The keys the user set, as opposed to the values conf/ gives: each `key=value` on the stage's command line,
    and each value in params.yaml that differs from conf/ composed with the same group choices (`dvc exp run -S
    optim.lr=0.01` writes it there). A group choice (`-S optim=sgd`) sets no key by itself: its values are conf/'s.
    The group choices are not in params.yaml; each group's is the option its values match best (ties: the
    default in conf/config.yaml)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    conf_dir = root / "conf"
    raw = read_params(params or root / "params.yaml")
    defaults = {
        group: option
        for entry in (yaml.safe_load((conf_dir / "config.yaml").read_text()) or {}).get("defaults", [])
        if isinstance(entry, dict)
        for group, option in entry.items()
    }
    choices = [f"{group}={_closest_option(conf_dir, group, raw.get(group), defaults.get(group))}" for group in defaults]
    baseline = flatten(compose(choices, conf_dir=conf_dir))
    keys = {key for key, value in flatten(raw).items() if key not in baseline or baseline[key] != value}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(f"bad override: {_first_line(str(exc))}") from None
    for ov in parsed:
        key = ov.key_or_group
        if not ("." not in key and (conf_dir / key).is_dir()) and not ov.is_delete():
            keys.add(key)
    return frozenset(keys)


def _closest_option(conf_dir: Path, group: str, values: Any, default: str | None) -> str:
    """The option of `conf/<group>/` whose values agree with `values` on the most keys (ties: `default`)."""
    given = flatten(values) if isinstance(values, dict) else {}

    def agreement(option: str) -> tuple[int, bool]:
        option_values = flatten(_group_option(conf_dir, group, option))
        return sum(given.get(k, _ABSENT) == v for k, v in option_values.items()), option == default

    return max(sorted(p.stem for p in (conf_dir / group).glob("*.yaml")), key=agreement)


def apply_overrides(raw: dict[str, Any], overrides: list[str], conf_dir: Path) -> dict[str, Any]:
    """Apply `key=value` and `group=option` overrides (Hydra syntax) to a plain config dict."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    cfg = OmegaConf.create(raw)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(f"bad override: {_first_line(str(exc))}") from None
    # Like Hydra: group choices first, then key overrides on top, whatever order they were given in.
    groups = [ov for ov in parsed if "." not in ov.key_or_group and (conf_dir / ov.key_or_group).is_dir()]
    for ov in groups + [ov for ov in parsed if ov not in groups]:
        key = ov.key_or_group
        value = ov.value()
        group_file = conf_dir / key / f"{value}.yaml"
        if "." not in key and (conf_dir / key).is_dir():
            if not group_file.is_file():
                options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
                raise ConfigError(f"{key}={value}: unknown {key}; choose one of {', '.join(options)}")
            cfg[key] = OmegaConf.create(_group_option(conf_dir, key, str(value)))
        elif ov.is_delete():
            raise ConfigError(f"~{key}: deleting keys is not supported")
        else:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def _group_option(conf_dir: Path, group: str, option: str) -> dict[str, Any]:
    """The values of `conf/<group>/<option>.yaml`. One that extends another option (a `defaults:` list, as
    conf/trainer/ddp.yaml extends default.yaml) is composed by Hydra, as `dvc exp run -S group=option` does."""
    values = yaml.safe_load((conf_dir / group / f"{option}.yaml").read_text()) or {}
    if isinstance(values, dict) and "defaults" in values:
        return compose([f"{group}={option}"], conf_dir=conf_dir)[group]
    return values


def _check_sections(raw: Any, schema: Any, prefix: str = "") -> None:
    """A plain value where the schema has a section (`data.split=0.5`): name the key, which OmegaConf's
    merge error does not."""
    if not isinstance(raw, dict):
        return
    hints = get_type_hints(schema)
    for f in fields(schema):
        section = hints[f.name]
        if f.name in raw and isinstance(section, type) and is_dataclass(section):
            value = raw[f.name]
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{prefix}{f.name} must be a mapping of keys, got {value!r}")
            _check_sections(value, section, f"{prefix}{f.name}.")


def missing_keys(raw: Any, schema: Any = Config, prefix: str = "") -> list[str]:
    """The dotted keys the schema requires that `raw` leaves out (a section left out is named, not its
    leaves). Only ParamSpace fields have defaults (not given); every other key must be present."""
    if not isinstance(raw, dict):
        return []
    hints = get_type_hints(schema)
    missing: list[str] = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                missing.append(name)
            continue
        kind = hints[f.name]
        if isinstance(kind, type) and is_dataclass(kind):
            missing += missing_keys(raw[f.name], kind, f"{name}.")
        elif getattr(kind, "__origin__", None) is dict and isinstance(raw[f.name], dict):
            entry = kind.__args__[1]
            if is_dataclass(entry):
                for key, value in raw[f.name].items():
                    missing += missing_keys(value, entry, f"{name}.{key}.")
    return missing


def to_config(raw: dict[str, Any], source: str = "config", root: Path | None = None) -> Config:
    """Check `raw` against the schema (unknown keys, types, keys left out, missing values), then validate
    values (and the output paths against the project at `root`, when given). `raw` must hold every key: the
    schema has no defaults (conf/ is the one source), so a params file without a key is an error naming it."""
    _check_sections(raw, Config)
    try:
        merged: DictConfig = OmegaConf.merge(OmegaConf.structured(Config), raw)  # type: ignore[assignment]
        absent = missing_keys(raw)
        if absent:
            shown = ", ".join(absent[:8]) + (f" and {len(absent) - 8} more" if len(absent) > 8 else "")
            raise ConfigError(
                f"{source}: missing {'key' if len(absent) == 1 else 'keys'} {shown}; every key must be set, and "
                "conf/ is the one source of defaults (re-compose params.yaml: make params)"
            )
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} is required (set {exc.full_key}=...)") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key}: {_first_line(getattr(exc, 'msg', None) or str(exc))} ({source})") from None
    validate(cfg, root)
    return cfg


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def declared_names(conf_dir: Path, group: str) -> tuple[str, ...]:
    """The `name`s the options of `conf/<group>/` declare (conf/model/*.yaml: cnn, cnn_bn, resnet_small): the
    values `<group>.name` may take. Names, not builders: the builders are registered above this module
    (models/registry.py, training/optimizers.py), which imports config, so config reads the names from conf/
    instead of importing them back; tests/test_registries.py keeps conf/ and the registries the same set."""
    names = set()
    for option in sorted(p.stem for p in (conf_dir / group).glob("*.yaml")):
        values = _group_option(conf_dir, group, option)
        if isinstance(values, dict) and isinstance(values.get("name"), str):
            names.add(values["name"])
    return tuple(sorted(names))


def _check_name(names: dict[str, tuple[str, ...]], group: str, value: Any, key: str | None = None) -> None:
    known = names.get(group)
    if known:  # none when the root is unknown or the group has no options: nothing declares names
        _check(value in known, key or f"{group}.name", f"one of {', '.join(known)}", value)


def validate(cfg: Config, root: Path | None = None) -> None:
    """Value rules the type system cannot express; the first violation is raised, naming its key. With the
    project `root`, the output paths too (validate_paths), and model.name / optim.name against the names the
    project's conf/ declares (declared_names), sweep choices of those keys included."""
    names = {g: declared_names(root / "conf", g) for g in NAMED_GROUPS} if root is not None else {}
    _check(cfg.seed >= 0, "seed", ">= 0", cfg.seed)
    d = cfg.data
    _check(d.name in DATA_SOURCES, "data.name", f"one of {', '.join(DATA_SOURCES)}", d.name)
    if d.name in ("imagefolder", "mnist_idx"):
        _check(bool(d.path), "data.path", f"a folder for data={d.name}", d.path)
    _check(d.channels in (1, 3), "data.channels", "1 or 3", d.channels)
    _check(
        d.image_size is None or 4 <= d.image_size <= 1024,
        "data.image_size",
        "null (the model's own) or between 4 and 1024",
        d.image_size,
    )
    for part in ("train", "val", "test"):
        ratio = getattr(d.split, part)
        _check(_finite(ratio) and 0 < ratio < 1, f"data.split.{part}", "in (0, 1)", ratio)
    total = d.split.train + d.split.val + d.split.test
    _check(abs(total - 1) < 1e-6, "data.split", "ratios that sum to 1", round(total, 6))
    _check(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    _check(d.on_device in ("auto", "always", "never"), "data.on_device", "auto, always or never", d.on_device)
    _check(d.workers >= 0, "data.workers", ">= 0", d.workers)
    _check(d.dedupe in ("none", "exact", "near"), "data.dedupe", "none, exact or near", d.dedupe)
    _check(  # two unrelated 64-bit hashes are within 32 bits half the time; photos of different classes pair from 6
        0 <= d.near_duplicate_bits <= 16,
        "data.near_duplicate_bits",
        "between 0 and 16 (of a 64-bit perceptual hash; 4 by default)",
        d.near_duplicate_bits,
    )

    a = cfg.augment
    _check(0 <= a.copies <= 100, "augment.copies", "between 0 and 100", a.copies)
    _check(_finite(a.rotate) and 0 <= a.rotate <= 180, "augment.rotate", "in [0, 180] degrees", a.rotate)
    _check(_finite(a.translate) and 0 <= a.translate < 1, "augment.translate", "in [0, 1)", a.translate)
    _check(
        len(a.scale) == 2 and all(_finite(s) and s > 0 for s in a.scale) and a.scale[0] <= a.scale[1],
        "augment.scale",
        "[low, high] with 0 < low <= high",
        a.scale,
    )
    for key in ("brightness", "contrast", "noise_std"):
        value = getattr(a, key)
        _check(_finite(value) and 0 <= value <= 1, f"augment.{key}", "in [0, 1]", value)
    _check(_finite(a.erase_prob) and 0 <= a.erase_prob <= 1, "augment.erase_prob", "in [0, 1]", a.erase_prob)
    _check(
        len(a.erase_area) == 2 and 0 < a.erase_area[0] <= a.erase_area[1] < 1,
        "augment.erase_area",
        "[low, high] with 0 < low <= high < 1",
        a.erase_area,
    )
    _check(0 <= a.preview <= 1024, "augment.preview", "between 0 and 1024", a.preview)
    on = a.online
    _check(
        on.crop_scale is None or (len(on.crop_scale) == 2 and 0 < on.crop_scale[0] <= on.crop_scale[1] <= 1),
        "augment.online.crop_scale",
        "null or [low, high] with 0 < low <= high <= 1",
        on.crop_scale,
    )
    _check(on.policy in POLICIES, "augment.online.policy", f"one of {', '.join(POLICIES)}", on.policy)
    for key in ("mixup", "cutmix"):
        value = getattr(on, key)
        _check(_finite(value) and value >= 0, f"augment.online.{key}", ">= 0 (a Beta alpha; 0 = off)", value)

    m = cfg.model
    _check_name(names, "model", m.name)
    _check(
        len(m.channels) >= 1 and all(c >= 1 for c in m.channels),
        "model.channels",
        "a non-empty list of positive widths",
        m.channels,
    )
    _check(m.convs_per_block >= 1, "model.convs_per_block", ">= 1", m.convs_per_block)
    _check(all(h >= 1 for h in m.hidden), "model.hidden", "a list of positive widths", m.hidden)
    _check(_finite(m.dropout) and 0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
    _check(m.freeze_epochs >= 0, "model.freeze_epochs", ">= 0", m.freeze_epochs)
    _check(
        not m.freeze_epochs or bool(m.init_from) or m.pretrained,
        "model.freeze_epochs",
        "0 unless the backbone comes trained (model.init_from set, or model.pretrained=true; with "
        "model.pretrained=false set model.freeze_epochs=0 too)",
        m.freeze_epochs,
    )
    if m.name in PRETRAINED_FAMILIES:
        _check(bool(m.arch), "model.arch", f"a model name for model={m.name} (e.g. resnet18.a1_in1k)", m.arch)
        _check(
            not (m.weights and not m.pretrained),
            "model.weights",
            "null when model.pretrained=false (weights are only loaded for a pretrained backbone)",
            m.weights,
        )
        _check(
            not (m.pretrained and m.init_from),
            "model.init_from",
            "null when model.pretrained=true (the backbone's weights come from one place)",
            m.init_from,
        )
    else:
        for key, off in (("arch", None), ("pretrained", False), ("weights", None)):
            value = getattr(m, key)
            _check(
                value == off,
                f"model.{key}",
                f"{off if off is not None else 'null'} for model={m.name} (only {', '.join(PRETRAINED_FAMILIES)} "
                "takes it)",
                value,
            )
    for key in ("mean", "std"):
        value = getattr(m, key)
        _check(
            value is None
            or (len(value) == d.channels and all(_finite(v) and (v > 0 if key == "std" else True) for v in value)),
            f"model.{key}",
            f"null (the model's own) or {d.channels} number(s), one per data channel"
            + (", > 0" if key == "std" else ""),
            value,
        )
    _check(
        m.interpolation is None or m.interpolation in INTERPOLATIONS,
        "model.interpolation",
        f"null (the model's own) or one of {', '.join(INTERPOLATIONS)}",
        m.interpolation,
    )
    _check(
        m.crop_pct is None or (_finite(m.crop_pct) and 0.5 <= m.crop_pct <= 1),
        "model.crop_pct",
        "null (the model's own) or in [0.5, 1]",
        m.crop_pct,
    )

    o = cfg.optim
    _check_name(names, "optim", o.name)
    _check(_finite(o.lr) and o.lr > 0, "optim.lr", "> 0", o.lr)
    _check(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    _check(_finite(o.momentum) and 0 <= o.momentum < 1, "optim.momentum", "in [0, 1)", o.momentum)
    _check(o.scheduler in SCHEDULERS, "optim.scheduler", f"one of {', '.join(SCHEDULERS)}", o.scheduler)
    _check(_finite(o.backbone_lr) and 0 < o.backbone_lr <= 1, "optim.backbone_lr", "in (0, 1]", o.backbone_lr)

    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    _check(t.hparams in ("params", "sweep"), "train.hparams", "params or sweep", t.hparams)
    _check(
        _finite(t.label_smoothing) and 0 <= t.label_smoothing < 1,
        "train.label_smoothing",
        "in [0, 1)",
        t.label_smoothing,
    )
    _check(_finite(t.grad_clip) and t.grad_clip >= 0, "train.grad_clip", ">= 0", t.grad_clip)
    _check(t.monitor in MONITORS, "train.monitor", f"one of {', '.join(MONITORS)}", t.monitor)
    _check(t.monitor_mode in ("min", "max"), "train.monitor_mode", "min or max", t.monitor_mode)
    _check(t.resume in ("auto", "never"), "train.resume", "auto or never", t.resume)
    _check(t.early_stopping_patience >= 0, "train.early_stopping_patience", ">= 0", t.early_stopping_patience)
    _check(_finite(t.ema) and (t.ema == 0 or 0.5 <= t.ema < 1), "train.ema", "0 (off) or in [0.5, 1)", t.ema)
    _check(1 <= t.accumulate <= 1024, "train.accumulate", "between 1 and 1024", t.accumulate)
    _check(
        t.class_balance in ("none", "loss", "sampler"), "train.class_balance", "none, loss or sampler", t.class_balance
    )

    tr = cfg.trainer
    _check(
        tr.accelerator in ACCELERATORS,
        "trainer.accelerator",
        f"one of {', '.join(ACCELERATORS)}",
        tr.accelerator,
    )
    _check(tr.devices >= 1, "trainer.devices", ">= 1", tr.devices)
    _check(tr.num_nodes >= 1, "trainer.num_nodes", ">= 1", tr.num_nodes)
    _check(tr.precision in PRECISIONS, "trainer.precision", f"one of {', '.join(PRECISIONS)}", tr.precision)
    _check(tr.threads >= 0, "trainer.threads", ">= 0", tr.threads)
    _check(
        not (cfg.train.ema and tr.precision == "bf16-true"),
        "trainer.precision",
        "a mixed or full precision with train.ema (the weight average needs float32 weights: bf16-mixed)",
        tr.precision,
    )
    _check(tr.steps_per_call >= 1, "trainer.steps_per_call", ">= 1", tr.steps_per_call)
    _check(tr.channels_last in ("auto", "on", "off"), "trainer.channels_last", "auto, on or off", tr.channels_last)
    _check(tr.scale_lr in ("none", "linear", "sqrt"), "trainer.scale_lr", "none, linear or sqrt", tr.scale_lr)
    _check(tr.strategy in STRATEGIES, "trainer.strategy", f"one of {', '.join(STRATEGIES)}", tr.strategy)
    tk = cfg.tracking
    _check(
        tk.champion_metric in TEST_METRICS,
        "tracking.champion_metric",
        f"one of {', '.join(TEST_METRICS)}",
        tk.champion_metric,
    )
    _check(tk.champion_mode in ("min", "max"), "tracking.champion_mode", "min or max", tk.champion_mode)
    validate_sweep(cfg)
    named = {f"{group}.name": group for group in NAMED_GROUPS}
    for entry, p in cfg.sweep.space.items():  # trials re-validate without the root: their names are checked here
        if p.type == "categorical" and p.key in named:
            for choice in p.choices or []:
                _check_name(names, named[p.key], choice, f"sweep.space.{entry}.choices")
    if root is not None:
        validate_paths(cfg, root)


def validate_paths(cfg: Config, root: Path) -> None:
    """Every output path (`paths.*`), symlinks and `..` resolved, is a folder strictly inside the project:
    not the project, not above it, not in its source folders (SOURCE_FOLDERS), not a file, and no two are the
    same or nested. Outside the project only with `paths.allow_outside=true` (still never above it, never in
    its sources). `paths.optuna` is relative to the store root: DVC's experiment copies share the original's.
    """
    project = root.resolve()
    resolved: dict[str, Path] = {}
    for key in OUTPUT_PATHS:
        value = getattr(cfg.paths, key)
        base = store_root(project) if key == "optuna" else project
        path = (base / value).resolve()
        name = f"paths.{key}"
        if base.is_relative_to(path):
            what = "the project folder itself" if path == base else "a folder above the project"
            raise ConfigError(f"{name} must be a folder inside the project, got {value!r} ({what})")
        if path.is_relative_to(base):
            top = path.relative_to(base).parts[0]
            _check(
                top not in SOURCE_FOLDERS,
                name,
                f"a folder outside the project's sources ({', '.join(SOURCE_FOLDERS)})",
                value,
            )
        elif not cfg.paths.allow_outside:
            raise ConfigError(
                f"{name} must be a folder inside the project, got {value!r} (resolves to {path}, outside "
                f"{base}; set paths.allow_outside=true to write there)"
            )
        _check(not path.exists() or path.is_dir(), name, "a folder, not a file", value)
        for other, other_path in resolved.items():
            if path.is_relative_to(other_path) or other_path.is_relative_to(path):
                raise ConfigError(
                    f"paths.{other} and {name} must be separate folders (neither the same nor one inside the "
                    f"other), got {getattr(cfg.paths, other)!r} and {value!r}"
                )
        resolved[key] = path


def validate_sweep(cfg: Config) -> None:
    sw = cfg.sweep
    _check(sw.n_trials >= 1, "sweep.n_trials", ">= 1", sw.n_trials)
    _check(
        sw.timeout is None or (_finite(sw.timeout) and sw.timeout > 0),
        "sweep.timeout",
        "null or > 0 seconds",
        sw.timeout,
    )
    _check(sw.metric in MONITORS, "sweep.metric", f"one of {', '.join(MONITORS)}", sw.metric)
    _check(sw.direction in ("maximize", "minimize"), "sweep.direction", "maximize or minimize", sw.direction)
    _check(sw.sampler in SAMPLERS, "sweep.sampler", f"one of {', '.join(SAMPLERS)}", sw.sampler)
    _check(sw.pruner in PRUNERS, "sweep.pruner", f"one of {', '.join(PRUNERS)}", sw.pruner)
    _check(sw.prune_on in MONITORS, "sweep.prune_on", f"one of {', '.join(MONITORS)}", sw.prune_on)
    _check(sw.n_startup_trials >= 0, "sweep.n_startup_trials", ">= 0", sw.n_startup_trials)
    _check(sw.pruner_startup_trials >= 0, "sweep.pruner_startup_trials", ">= 0", sw.pruner_startup_trials)
    _check(sw.n_warmup_epochs >= 0, "sweep.n_warmup_epochs", ">= 0", sw.n_warmup_epochs)
    _check(1 <= sw.workers <= 64, "sweep.workers", "between 1 and 64", sw.workers)
    known = flatten(as_dict(cfg))
    for name, p in sw.space.items():
        where = f"sweep.space.{name}"
        _check(
            p.key in known and not p.key.startswith(("sweep.", "paths.", "tracking.")),
            f"{where}.key",
            "an existing config key outside sweep/paths/tracking",
            p.key,
        )
        _check(p.type in PARAM_TYPES, f"{where}.type", f"one of {', '.join(PARAM_TYPES)}", p.type)
        if p.type == "categorical":
            _check(bool(p.choices), f"{where}.choices", "a non-empty list", p.choices)
            continue
        _check(
            p.low is not None and p.high is not None and _finite(p.low) and _finite(p.high),
            f"{where}",
            "given low and high",
            (p.low, p.high),
        )
        _check(p.low <= p.high, f"{where}.low", f"<= high ({p.high})", p.low)  # type: ignore[operator]
        _check(not p.log or p.low > 0, f"{where}.low", "> 0 on a log scale", p.low)  # type: ignore[operator]
        _check(p.step is None or p.step > 0, f"{where}.step", "null or > 0", p.step)
        _check(not (p.log and p.step is not None), f"{where}.step", "null when log is true", p.step)


def with_values(cfg: Config, values: dict[str, Any], source: str = "overrides", root: Path | None = None) -> Config:
    """A copy of `cfg` with dotted keys set (`{"optim.lr": 0.01}`), re-checked and re-validated (with the project
    `root`, the names of `model.name` / `optim.name` against conf/ too, as `load_config` does)."""
    tree = OmegaConf.create(as_dict(cfg))
    for key, value in values.items():
        OmegaConf.update(tree, key, value, merge=False)
    return to_config(OmegaConf.to_container(tree), source=source, root=root)  # type: ignore[arg-type]


def as_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML artifacts)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 0.1}}` -> `{"optim.lr": 0.1}`: MLflow param names that line up across runs."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnpipe.config", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    comp = sub.add_parser("compose", help="compose conf/ (with overrides) into a params file")
    comp.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    comp.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    try:
        composed = compose(args.overrides)
        to_config(composed, source="conf/", root=find_project_root())
    except ConfigError as exc:
        raise SystemExit(f"cnnpipe config: error: {exc}") from None
    text = yaml.safe_dump(composed, sort_keys=False)
    if args.out is None:
        print(text, end="")
    else:
        from cnnpipe.atomic import write_text_atomic

        write_text_atomic(args.out, text)


if __name__ == "__main__":
    _main()
