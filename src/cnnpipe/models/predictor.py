"""A trained network and its spec, answering raw images with class names and probabilities.

No mlflow here: the predict command (`cnnpipe.serving`) and the MLflow pyfunc model (`cnnpipe.tracking`) both
answer through it, so it sits below both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cnnpipe.data.inputs import to_batch
from cnnpipe.models.store import load_model

PROB_PREFIX = "prob_"  # per-class probability columns: prob_<class name>


class ImagePredictor:
    """Raw images in (see `cnnpipe.data.inputs`), one row per image out: `class`, `probability`, one
    `prob_<class>` column per class, and `error` (None, or why that image could not be used)."""

    def __init__(self, net: nn.Module, spec: dict[str, Any], batch_size: int = 512) -> None:
        self.net, self.spec, self.batch_size = net.cpu().eval(), spec, batch_size
        self.classes = [str(c) for c in spec["classes"]]
        self.in_shape = [int(d) for d in spec["in_shape"]]  # as prepare stored images; the net crops its input
        self.interpolation = str(spec.get("interpolation", "bilinear"))
        # A spec written before the preprocessing record (no input_size) was trained on whole images squashed square.
        self.square = "input_size" in spec

    @classmethod
    def from_folder(cls, folder: Path) -> ImagePredictor:
        """From `model.safetensors` + `model.json` (what the train stage writes to models/): no pickle."""
        net, spec = load_model(Path(folder))
        return cls(net, spec)

    @property
    def columns(self) -> list[str]:
        return ["class", "probability", *(f"{PROB_PREFIX}{c}" for c in self.classes), "error"]

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax over classes for uint8 (N, C, H, W) at the model's shape; x / 255, as in training."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        out = [
            self.net(x[i : i + self.batch_size].float().div_(255.0)).float().softmax(dim=1)
            for i in range(0, len(x), self.batch_size)
        ]
        return torch.cat(out).numpy().astype(np.float64)

    def predict(self, model_input: Any) -> pd.DataFrame:
        batch = to_batch(model_input, self.in_shape, interpolation=self.interpolation, square=self.square)
        probs = self.probabilities(batch.images)
        best = probs.argmax(axis=1)
        frame = pd.DataFrame(
            {
                "class": [self.classes[i] for i in best],
                "probability": probs[np.arange(len(best)), best],
                **{f"{PROB_PREFIX}{c}": probs[:, j] for j, c in enumerate(self.classes)},
                "error": pd.Series(batch.errors, dtype=object),  # None when fine (pandas 3 would make it NaN)
            },
            columns=self.columns,
        )
        failed = np.array([e is not None for e in batch.errors])
        if failed.any():
            # None rather than NaN in failed rows: MLflow's JSON response must stay valid JSON (no NaN).
            frame = frame.astype(object)
            frame.loc[failed, [c for c in self.columns if c != "error"]] = None
        return frame
