"""Save and load a model as spec JSON + safetensors weights: loading never unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from cnnpipe.atomic import atomic_path, write_json_atomic
from cnnpipe.errors import DataError
from cnnpipe.models.factory import build_model

WEIGHTS = "model.safetensors"
SPEC = "model.json"


def save_model(folder: Path, net: nn.Module, spec: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / SPEC, spec)


def load_model(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode on the CPU, and its spec."""
    spec_path, weights_path = folder / SPEC, folder / WEIGHTS
    if not spec_path.is_file() or not weights_path.is_file():
        raise DataError(f"{folder}: no trained model ({SPEC} + {WEIGHTS}); run `dvc repro train` first")
    spec = json.loads(spec_path.read_text())
    net = build_model(spec)
    net.load_state_dict(load_file(str(weights_path)))
    return net.eval(), spec
