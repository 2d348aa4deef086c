"""Resolve `model.init_from` to weights: a registered model, a train run, a models/ folder, or a Lightning
checkpoint. Nothing is downloaded from outside: weights come from the user's own runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from cnnpipe.config import Config
from cnnpipe.console import info
from cnnpipe.errors import ConfigError, DataError
from cnnpipe.models.layers import NORMALIZE_PREFIX
from cnnpipe.models.store import load_model
from cnnpipe.models.transfer import head_parameter_names, transfer_weights

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def source_state(init_from: str, cfg: Config, root: Path) -> dict[str, torch.Tensor]:
    """The source model's state dict (network keys, no `net.` prefix)."""
    path = Path(init_from).expanduser()
    if not path.is_absolute():
        path = root / path
    if path.is_dir():
        net, _ = load_model(path)
        return net.state_dict()
    if path.suffix == ".ckpt" and path.is_file():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a bad or unsafe file
            raise DataError(f"{path}: not a loadable checkpoint ({type(exc).__name__})") from None
        state = ckpt.get("state_dict", {})
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    if init_from.startswith(("models:/", "runs:/")) or _RUN_ID.match(init_from):
        from cnnpipe.tracking.registry import load_pyfunc

        model = load_pyfunc(init_from, cfg.tracking.uri, root).unwrap_python_model()
        return model.predictor.net.state_dict()
    raise ConfigError(
        f"model.init_from must be a models:/ URI, a run id, a models folder or a .ckpt file, got {init_from!r}"
    )


def initialise_from(net: nn.Module, cfg: Config, root: Path) -> None:
    """Load the source's backbone into `net`; refuse when nothing but the head would match."""
    assert cfg.model.init_from
    report = transfer_weights(net, source_state(cfg.model.init_from, cfg, root))
    head = head_parameter_names(net)
    backbone = [k for k in report.loaded if k not in head and not k.startswith(NORMALIZE_PREFIX)]
    if not backbone:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from}: no backbone weight fits model "
            f"{cfg.model.name} {cfg.model.channels} with {cfg.data.channels} input channel(s)"
        )
    info(
        "train",
        f"initialised {len(report.loaded)} tensors from {cfg.model.init_from} "
        f"({len(report.skipped)} left new: the head for the new classes, normalisation)",
    )
