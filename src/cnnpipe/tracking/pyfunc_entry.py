"""MLflow "models from code" file for `ImageClassifierModel`: MLflow copies it into the logged model and runs
it at load time. Never imported by cnnpipe itself (importing it registers the model with MLflow)."""

from mlflow.models import set_model

from cnnpipe.tracking.pyfunc_model import ImageClassifierModel

set_model(ImageClassifierModel())
