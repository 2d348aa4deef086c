"""Log the trained model as an MLflow pyfunc model that takes raw images (see `pyfunc_model`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import cnnpipe
from cnnpipe.models.store import SPEC, WEIGHTS
from cnnpipe.monitoring.prediction_log import logging_off
from cnnpipe.monitoring.reference import REFERENCE

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
# What the model's code (cnnpipe.models + data, shipped with the model) imports at inference time.
RUNTIME_DISTRIBUTIONS = ("torch", "numpy", "pandas", "pillow", "safetensors", "omegaconf", "pyyaml", "mlflow")
# What a model family needs besides (model.name -> distributions): timm networks are built by timm.
FAMILY_DISTRIBUTIONS = {"timm": ("timm", "torchvision")}


def pip_requirements(family: str | None = None) -> list[str]:
    """The installed versions, pinned; torch without its local build tag (`2.13.0+cpu` -> `2.13.0`). `family`:
    the model's `model.name`, whose own distributions are added (FAMILY_DISTRIBUTIONS)."""
    pins = []
    for dist in (*RUNTIME_DISTRIBUTIONS, *FAMILY_DISTRIBUTIONS.get(family or "", ())):
        try:
            pins.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins


def model_signature(classes: list[str]) -> ModelSignature:
    """Input: one image per item, of any accepted kind (pixel array, bytes, base64 text): MLflow's schemas
    cannot express "(N,H,W) or (N,H,W,C) or encoded bytes", so the input is an untyped object tensor and
    `cnnpipe.data.inputs` checks it. Output: class, probability, prob_<class>..., error."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    from cnnpipe.models.predictor import PROB_PREFIX

    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", "class"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"{PROB_PREFIX}{c}") for c in classes]
    outputs.append(ColSpec("string", "error", required=False))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(object), (-1,))]), outputs=Schema(outputs))


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """No artifact progress bars while MLflow reloads the model to check the input example (this call only)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def log_image_model(models_dir: Path, example: np.ndarray, name: str = "model") -> str:
    """Log `models_dir`'s model.safetensors + model.json into the active run; returns the model URI.
    `example`: a few uint8 (N, C, H, W) training images, kept as the model's input example."""
    import mlflow.pyfunc

    from cnnpipe.models.predictor import ImagePredictor
    from cnnpipe.tracking.pyfunc_model import MODEL_ARTIFACT

    predictor = ImagePredictor.from_folder(models_dir)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        folder.mkdir()
        for file in (WEIGHTS, SPEC, REFERENCE):
            if file != REFERENCE or (models_dir / file).is_file():  # the reference: models since the monitor
                shutil.copy2(models_dir / file, folder / file)
        with _quiet_mlflow(), logging_off():  # MLflow predicts the example: not a served prediction
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(ENTRY),
                artifacts={MODEL_ARTIFACT: str(folder)},
                code_paths=[str(Path(cnnpipe.__file__).parent)],  # the preprocessing travels with the weights
                signature=model_signature(predictor.classes),
                input_example=np.ascontiguousarray(example, dtype=np.uint8),
                pip_requirements=pip_requirements(str(predictor.spec["model"]["name"])),
                metadata={"cnnpipe": {"classes": predictor.classes, "in_shape": predictor.in_shape}},
            )
    return info.model_uri
