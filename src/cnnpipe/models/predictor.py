"""A trained network and its spec, answering raw images with class names and probabilities.

No mlflow here: the predict command (`cnnpipe.serving`) and the MLflow pyfunc model (`cnnpipe.tracking`) both
answer through it, so it sits below both."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cnnpipe.data.inputs import to_batch
from cnnpipe.models.store import load_model
from cnnpipe.monitoring.features import Observed, Tap, classifier_layer, input_stats, project
from cnnpipe.monitoring.reference import REFERENCE, Reference, load_reference

PROB_PREFIX = "prob_"  # per-class probability columns: prob_<class name>


class ImagePredictor:
    """Raw images in (see `cnnpipe.data.inputs`), one row per image out: `class`, `probability`, one
    `prob_<class>` column per class, and `error` (None, or why that image could not be used)."""

    def __init__(
        self,
        net: nn.Module,
        spec: dict[str, Any],
        batch_size: int = 512,
        reference: Reference | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)  # the CPU to serve; the training device for the reference at training
        self.net, self.spec, self.batch_size = net.to(self.device).eval(), spec, batch_size
        self.reference = reference  # the training reference, when the model folder has one (models since #14)
        self._taps: dict[str, Tap] = {}  # layer -> its hook, made on first use
        self._taps_lock = threading.Lock()
        self.classes = [str(c) for c in spec["classes"]]
        self.in_shape = [int(d) for d in spec["in_shape"]]  # as prepare stored images; the net crops its input
        self.interpolation = str(spec.get("interpolation", "bilinear"))
        # A spec written before the preprocessing record (no input_size) was trained on whole images squashed square.
        self.square = "input_size" in spec

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device | str = "cpu") -> ImagePredictor:
        """From `model.safetensors` + `model.json` (what the train stage writes to models/): no pickle; with the
        training reference (`reference.npz`) when the folder has one."""
        net, spec = load_model(Path(folder))
        reference = load_reference(folder / REFERENCE) if (Path(folder) / REFERENCE).is_file() else None
        return cls(net, spec, reference=reference, device=device)

    @property
    def columns(self) -> list[str]:
        return ["class", "probability", *(f"{PROB_PREFIX}{c}" for c in self.classes), "error"]

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax over classes for uint8 (N, C, H, W) at the model's shape; x / 255, as in training."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        out = [
            self.net(x[i : i + self.batch_size].to(self.device).float().div_(255.0)).float().softmax(dim=1).cpu()
            for i in range(0, len(x), self.batch_size)
        ]
        return torch.cat(out).numpy().astype(np.float64)

    def classifier_layer(self) -> str | None:
        """The layer whose input is the penultimate embedding (see `monitoring.features.classifier_layer`)."""
        example = torch.zeros((2, *self.in_shape), device=self.device)
        return classifier_layer(self.net, example, len(self.classes))

    def embedded(self, images: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Softmax and the penultimate embedding (N, D) of uint8 (N, C, H, W) images, from the same forward pass."""
        with self._taps_lock:
            if layer not in self._taps:
                self._taps[layer] = Tap(self.net, layer)
            tap = self._taps[layer]
        with tap.capture() as seen:
            probs = self.probabilities(images)
        embeddings = torch.cat(seen).numpy() if seen else np.zeros((0, 0), dtype=np.float32)
        if len(embeddings) != len(images):  # never pair one image's numbers with another's
            raise RuntimeError(f"{layer}: {len(embeddings)} embeddings for {len(images)} images")
        return probs, embeddings

    def observe(self, model_input: Any) -> tuple[pd.DataFrame, Observed]:
        """`predict`'s frame, and what the prediction log keeps of each image (`Observed`)."""
        batch = to_batch(model_input, self.in_shape, interpolation=self.interpolation, square=self.square)
        ref = self.reference
        summary = None
        if ref is not None and ref.layer is not None and ref.axes is not None and ref.axes_mean is not None:
            probs, embeddings = self.embedded(batch.images, ref.layer)
            summary = project(embeddings, ref.axes_mean, ref.axes)
        else:
            probs = self.probabilities(batch.images)
        brightness, contrast = input_stats(batch.images)
        sizes = np.array([s if s is not None else (0, 0) for s in batch.sizes], dtype=np.int64).reshape(-1, 2)
        seen = Observed(batch.images, sizes[:, 0], sizes[:, 1], brightness, contrast, summary)
        return self._frame(probs, batch.errors), seen

    def predict(self, model_input: Any) -> pd.DataFrame:
        batch = to_batch(model_input, self.in_shape, interpolation=self.interpolation, square=self.square)
        return self._frame(self.probabilities(batch.images), batch.errors)

    def _frame(self, probs: np.ndarray, errors: list[str | None]) -> pd.DataFrame:
        """One row per image: class, probability, prob_<class>..., error (the failed rows all None but the error)."""
        best = probs.argmax(axis=1)
        frame = pd.DataFrame(
            {
                "class": [self.classes[i] for i in best],
                "probability": probs[np.arange(len(best)), best],
                **{f"{PROB_PREFIX}{c}": probs[:, j] for j, c in enumerate(self.classes)},
                "error": pd.Series(errors, dtype=object),  # None when fine (pandas 3 would make it NaN)
            },
            columns=self.columns,
        )
        failed = np.array([e is not None for e in errors])
        if failed.any():
            # None rather than NaN in failed rows: MLflow's JSON response must stay valid JSON (no NaN).
            frame = frame.astype(object)
            frame.loc[failed, [c for c in self.columns if c != "error"]] = None
        return frame
