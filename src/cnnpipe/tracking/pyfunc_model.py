"""The MLflow pyfunc face of a trained model: raw images in, class names and probabilities out.

Logged as "models from code" (`pyfunc_entry.py` is the code file): no pickled Python object, and the weights
are the pickle-free `model.safetensors` + `model.json` the train stage writes. The preprocessing is
`cnnpipe.models.predictor`'s, the same code the predict command runs on a local models/ folder.
"""

# No `from __future__ import annotations`: MLflow reads predict()'s type hints at class creation.
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from cnnpipe.errors import CnnpipeError
from cnnpipe.models.predictor import ImagePredictor

MODEL_ARTIFACT = "cnnpipe_model"  # the artifact folder holding model.safetensors + model.json


class ImageClassifierModel(PythonModel):
    """See `cnnpipe.data.inputs` for the accepted inputs and `ImagePredictor` for the output columns."""

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = ImagePredictor.from_folder(Path(context.artifacts[MODEL_ARTIFACT]))

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """`model_input` is an ndarray after MLflow enforced the (object tensor) signature: a pixel batch, or one
        item per image. An ndarray hint is one MLflow derives no signature from, so the logged one stands."""
        try:
            return self.predictor.predict(model_input)
        except CnnpipeError as exc:  # the caller's input: a 400 with our one-line reason, not a 500
            raise MlflowException.invalid_parameter_value(str(exc)) from None

    @property
    def spec(self) -> dict[str, Any]:
        """The model's spec (classes, in_shape, ...), for callers that prepare their own inputs."""
        return self.predictor.spec
