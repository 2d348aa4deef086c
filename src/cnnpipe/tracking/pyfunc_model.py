"""The MLflow pyfunc face of a trained model: raw images in, class names and probabilities out.

Logged as "models from code" (`pyfunc_entry.py` is the code file): no pickled Python object, and the weights
are the pickle-free `model.safetensors` + `model.json` the train stage writes. The preprocessing is
`cnnpipe.models.predictor`'s, the same code the predict command runs on a local models/ folder.
"""

# No `from __future__ import annotations`: MLflow reads predict()'s type hints at class creation.
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from cnnpipe.errors import CnnpipeError
from cnnpipe.models.predictor import ImagePredictor
from cnnpipe.monitoring.prediction_log import IMAGES_ENV, LOG_ENV, PredictionLogger, open_log

MODEL_ARTIFACT = "cnnpipe_model"  # the artifact folder holding model.safetensors + model.json
VERSION_ENV = "CNNPIPE_MODEL_VERSION"  # optional: the registry version a server serves, recorded with each answer
_logger = logging.getLogger("cnnpipe.prediction_log")


class ImageClassifierModel(PythonModel):
    """See `cnnpipe.data.inputs` for the accepted inputs and `ImagePredictor` for the output columns."""

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = ImagePredictor.from_folder(Path(context.artifacts[MODEL_ARTIFACT]))
        self.logger = prediction_logger(self.predictor)

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """`model_input` is an ndarray after MLflow enforced the (object tensor) signature: a pixel batch, or one
        item per image. An ndarray hint is one MLflow derives no signature from, so the logged one stands."""
        try:
            if self.logger is None:
                return self.predictor.predict(model_input)
            frame, seen = self.predictor.observe(model_input)
        except CnnpipeError as exc:  # the caller's input: a 400 with our one-line reason, not a 500
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        problem = self.logger(frame, seen)
        if problem:  # the answer still goes out: a log that cannot be written must not take the service down
            _logger.warning("prediction log %s: %s", self.logger.log.where, problem)
        return frame

    @property
    def logging_to(self) -> str | None:
        """Where this model logs its predictions (None: it does not)."""
        return None if self.logger is None else self.logger.log.where

    @property
    def spec(self) -> dict[str, Any]:
        """The model's spec (classes, in_shape, ...), for callers that prepare their own inputs."""
        return self.predictor.spec


def prediction_logger(predictor: ImagePredictor) -> PredictionLogger | None:
    """The logger the environment asks for (`CNNPIPE_PREDICTION_LOG`, e.g. for `mlflow models serve`); None when
    it does not: a served model logs only when told to. predict.py logs in its own process instead."""
    dest = os.environ.get(LOG_ENV, "").strip()
    if not dest:
        return None
    images = os.environ.get(IMAGES_ENV, "").strip()
    ref = predictor.reference
    return PredictionLogger(
        open_log(dest),
        model_run=None if ref is None else ref.info.get("model_run"),
        model_version=os.environ.get(VERSION_ENV) or None,
        images_dir=Path(images).expanduser() if images else None,
    )
