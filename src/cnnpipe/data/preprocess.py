"""What a network sees of an image: its input size, the size prepare stores images at, the interpolation and the
normalisation — resolved once from the config and the model family's own defaults (a timm network's pretrained
config, looked up by name: no model is built), written to meta.json by prepare and to model.json beside the
weights. Training, evaluation, the pyfunc model and predict.py all read them from there, so they preprocess alike.

The geometry is the usual one for pretrained networks: images are stored at `floor(input_size / crop_pct)` (short
side resized with `interpolation`, then centre-cropped square); training takes random-resized crops of
`input_size` from that (augment.online), everything else the centre `input_size` (the model's Normalize layer).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Any

from cnnpipe.config import INTERPOLATIONS, PRETRAINED_FAMILIES, Config, DataConfig, ModelConfig
from cnnpipe.errors import ConfigError, DataError

OWN_INPUT_SIZE = 32  # cnnpipe's own families with data.image_size null (an image folder): 32 x 32
OWN_INTERPOLATION = "bilinear"


@dataclass(frozen=True)
class Geometry:
    input_size: int  # the network's input side (training crops, evaluation centre crops)
    storage_size: int  # the side prepare stores images at: floor(input_size / crop_pct)
    interpolation: str  # how images are resized to the storage size
    crop_pct: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pretrained_config(arch: str) -> Any:
    """timm's pretrained config for `arch` (a name with or without its tag; no download, timm knows them all); an
    unknown name is one line with the closest known names. timm is imported here, not at module level: the other
    families never pay for it."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(arch):
        base = arch.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"model.arch must be a timm model name, got {arch!r}{hint}")
    try:
        cfg = get_pretrained_cfg(arch)
    except RuntimeError:  # a known architecture with a tag timm does not have
        cfg = None
    if cfg is None and "." in arch:
        raise ConfigError(f"model.arch: timm has {arch.split('.')[0]!r} but no pretrained tag {arch!r}")
    return cfg


def family_defaults(model: ModelConfig, channels: int) -> dict[str, Any]:
    """A pretrained family's own preprocessing, from the architecture's pretrained config: input size,
    interpolation, crop fraction, mean/std (averaged over RGB for grey data, as timm sums the first convolution's
    RGB weights for `in_chans=1`). Nothing for cnnpipe's own families: cnnpipe's defaults apply."""
    if model.name not in PRETRAINED_FAMILIES:
        return {}
    pcfg = pretrained_config(str(model.arch))
    if pcfg is None:
        return {}
    mean, std = list(pcfg.mean), list(pcfg.std)
    if channels == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return {
        "input_size": int(pcfg.input_size[-1]),
        "interpolation": pcfg.interpolation if pcfg.interpolation in INTERPOLATIONS else "bicubic",
        "crop_pct": float(pcfg.crop_pct),
        "mean": mean,
        "std": std,
    }


def resolve_geometry(data: DataConfig, model: ModelConfig) -> Geometry:
    """data.image_size, model.crop_pct and model.interpolation, each from the config when set, else the family's."""
    own = family_defaults(model, data.channels)
    input_size = int(data.image_size or own.get("input_size") or OWN_INPUT_SIZE)
    crop_pct = float(model.crop_pct or own.get("crop_pct") or 1.0)
    interpolation = str(model.interpolation or own.get("interpolation") or OWN_INTERPOLATION)
    return Geometry(input_size, max(input_size, math.floor(input_size / crop_pct)), interpolation, crop_pct)


def resolve_normalisation(model: ModelConfig, channels: int, meta: dict[str, Any]) -> tuple[list[float], list[float]]:
    """model.mean / model.std when set, else the family's (a pretrained network's), else the training split's."""
    own = family_defaults(model, channels)
    mean = model.mean or own.get("mean") or meta["mean"]
    std = model.std or own.get("std") or meta["std"]
    return [float(v) for v in mean], [float(v) for v in std]


def prepared_geometry(meta: dict[str, Any]) -> Geometry:
    """What prepare stored (meta.json); a folder prepared before geometry was recorded: square, no crop."""
    recorded = meta.get("preprocess")
    if isinstance(recorded, dict):
        return Geometry(**recorded)
    size = int(meta["image_shape"][-1])
    return Geometry(size, size, OWN_INTERPOLATION, 1.0)


def check_prepared(cfg: Config, meta: dict[str, Any], where: str) -> Geometry:
    """The prepared geometry, refused in one line when the config sets a value that differs from it. A key left null
    takes what prepare resolved (a sweep over model.arch trains every architecture on the same prepared images)."""
    prepared = prepared_geometry(meta)
    asked = {
        "data.image_size": (cfg.data.image_size, prepared.input_size),
        "model.crop_pct": (cfg.model.crop_pct, prepared.crop_pct),
        "model.interpolation": (cfg.model.interpolation, prepared.interpolation),
    }
    for key, (value, stored) in asked.items():
        if value is not None and value != stored:
            raise DataError(
                f"{where}: prepared with {key}={stored!r}, but the config sets {value!r}; re-run `dvc repro prepare`"
            )
    return prepared
