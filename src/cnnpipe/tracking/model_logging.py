"""Log the trained network as an MLflow model with a signature and an input example."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def log_torch_model(net: nn.Module, example: np.ndarray, name: str = "model") -> str:
    """Log into the active run; returns the model URI. Input: float32 (N, C, H, W) in [0, 1]."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    net = net.cpu().eval()
    with torch.no_grad():
        out = net(torch.from_numpy(example)).numpy()
    info = mlflow.pytorch.log_model(
        net,
        name=name,
        signature=infer_signature(example, out),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "cnnpipe"],
    )
    return info.model_uri
