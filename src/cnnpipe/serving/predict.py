"""A folder of images -> a CSV (file, class, probability, error), with a saved or registered model.

The CSV goes where `--out` says, else to `predictions/<folder name>.csv` in the project (a folder git ignores),
never into whatever folder the command happens to run in: a re-run on the same folder replaces that file.

The model is any of: a local models folder (model.safetensors + model.json, no MLflow involved), a train run id,
or an MLflow model URI (`models:/cnnpipe-digits@champion`, the default). Every image goes to the model as its
file's bytes, so the folder, the registry and `mlflow models serve` all decode it the same way. An image that
cannot be read or decoded gets a row with its reason, not an abort.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cnnpipe.atomic import write_text_atomic
from cnnpipe.config import Config
from cnnpipe.data.images import IMAGE_SUFFIXES
from cnnpipe.data.inputs import PixelLimits
from cnnpipe.errors import DataError
from cnnpipe.models.predictor import ImagePredictor
from cnnpipe.monitoring.features import Observed
from cnnpipe.monitoring.prediction_log import PredictionLogger, logging_off, open_log
from cnnpipe.redact import mask_secrets

COLUMNS = ("file", "class", "probability", "error")
CHAMPION = "champion"
PREDICTIONS_DIR = "predictions"  # in .gitignore

PredictFn = Callable[[list[bytes]], pd.DataFrame]


@dataclass
class PredictReport:
    images: int
    unreadable: int
    out: Path


def default_model_uri(cfg: Config) -> str:
    """The champion of the configured dataset's registered model."""
    from cnnpipe.tracking.registry import registered_model_name

    return f"models:/{registered_model_name(cfg.tracking.registered_model, cfg.data.name)}@{CHAMPION}"


def model_or_champion(model: str | None, cfg: Config | None) -> str:
    """The model the user named, else the configured dataset's champion (which needs the project's config)."""
    if model is not None:
        return model
    if cfg is None:
        raise DataError("no --model given and no cnnpipe project (params.yaml) to find the champion in")
    return default_model_uri(cfg)


def default_out(images: Path, root: Path | None) -> Path:
    """`<root>/predictions/<images folder name>.csv`: one file per folder, beside the project's other outputs
    whatever the working directory, and out of git's way; `./predictions/` when there is no project."""
    name = Path(os.path.abspath(images.expanduser())).name or "root"  # `.`, `..`: their folder's name; `/`: none
    return (root if root is not None else Path()) / PREDICTIONS_DIR / f"{name}.csv"


def shown(path: Path) -> str:
    """A default `path` as the user would type it from here: relative when under the working directory."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def is_model_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/"))


def models_folder(source: str) -> Path | None:
    """`source` as a local models folder (no MLflow involved), or None: it names an MLflow model, or nothing."""
    folder = Path(source).expanduser()
    return folder if not is_model_uri(source) and folder.is_dir() else None


def mlflow_project(source: str, cfg: Config | None, root: Path | None) -> tuple[Config, Path]:
    """The project's config and root, which loading `source` from MLflow needs (the tracking URI); refused in one
    line when `source` is no MLflow reference (a models:/ or runs:/ URI, a run id) or there is no project."""
    from cnnpipe.tracking.registry import RUN_ID

    if not (is_model_uri(source) or RUN_ID.match(source)):
        raise DataError(f"{source}: not a models folder, a run id or a models:/ or runs:/ URI")
    if cfg is None or root is None:
        raise DataError(f"{source}: loading from MLflow needs a cnnpipe project (params.yaml) for the tracking URI")
    return cfg, root


def load_predict_fn(
    source: str, cfg: Config | None, root: Path | None, log: str | None = None, log_images: Path | None = None
) -> PredictFn:
    """`source`: an MLflow model URI, a train run id, or a local models folder. `cfg` and `root` (the
    project) give the tracking URI; a local folder needs neither. `log`: append every answer to that prediction
    log (a file or a database URL, `monitoring.prediction_log`); `log_images`: keep the images there too."""
    folder = models_folder(source)
    if folder is not None:
        predictor = ImagePredictor.from_folder(folder)
        if not log:
            return predictor.predict
        ref = predictor.reference
        logger = PredictionLogger(open_log(log), None if ref is None else ref.info.get("model_run"), None, log_images)
        return _logged(predictor.observe, logger)
    from cnnpipe.tracking.registry import load_pyfunc

    cfg, root = mlflow_project(source, cfg, root)
    with logging_off():  # this process logs (below) or, with --no-log, nothing, whatever the environment says
        model = load_pyfunc(source, cfg.tracking.uri, root)
    if log:  # the model's own predictor, observed in this process: logged models of any cnnpipe version log
        from cnnpipe.tracking.pyfunc_model import ImageClassifierModel
        from cnnpipe.tracking.registry import model_version

        inner = model.unwrap_python_model()
        if not isinstance(inner, ImageClassifierModel):
            raise DataError(f"{source}: not a cnnpipe image model; its predictions cannot be logged (--no-log)")
        ref = inner.predictor.reference
        run = None if ref is None else ref.info.get("model_run")
        logger = PredictionLogger(open_log(log), run, model_version(source, cfg.tracking.uri, root), log_images)
        return _logged(inner.predictor.observe, logger)
    # The pyfunc's signature is one object tensor: one item (here: a file's bytes) per image.
    return lambda blobs: model.predict(np.array(blobs, dtype=object))


def _logged(observe: Callable[[list[bytes]], tuple[pd.DataFrame, Observed]], logger: PredictionLogger) -> PredictFn:
    def predict(blobs: list[bytes]) -> pd.DataFrame:
        frame, seen = observe(blobs)
        problem = logger(frame, seen)
        if problem:
            from cnnpipe.console import warn

            warn("predict", f"prediction log {logger.log.where}: {problem}")
        return frame

    return predict


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursive, sorted by relative path; hidden files and folders and other
    suffixes are skipped (as prepare does)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / name
            for name in sorted(filenames)
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def predict_folder(folder: Path, predict: PredictFn, out: Path, batch_size: int = 256) -> PredictReport:
    """Predict every image under `folder` in batches; write `out` atomically (all rows or nothing)."""
    files = image_files(folder)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    rows: list[dict[str, object]] = []
    for batch in batches(files, batch_size, PixelLimits.from_env().request):
        rows += _predict_batch(folder, batch, predict)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out, buf.getvalue())
    return PredictReport(len(rows), sum(1 for r in rows if r["error"]), out)


def batches(files: list[Path], size: int, max_pixels: int) -> Iterator[list[Path]]:
    """`files` in groups of at most `size`, each also under `max_pixels` in all (0: no bound) as read from the
    image headers: the model refuses a call past its request pixel limit, so a folder of large photos is sent in
    smaller calls rather than getting rows refused. A file whose header cannot be read counts 0 (its row says why)."""
    batch: list[Path] = []
    pixels = 0
    for path in files:
        n = _header_pixels(path)
        if batch and (len(batch) == size or (max_pixels and pixels + n > max_pixels)):
            yield batch
            batch, pixels = [], 0
        batch.append(path)
        pixels += n
    if batch:
        yield batch


def _header_pixels(path: Path) -> int:
    try:
        with Image.open(path) as img:  # lazy: reads the header, decodes nothing
            return img.width * img.height
    except (OSError, ValueError, Image.DecompressionBombError):
        return 0


def _predict_batch(folder: Path, files: list[Path], predict: PredictFn) -> list[dict[str, object]]:
    names = [f.relative_to(folder).as_posix() for f in files]
    blobs: list[bytes] = []
    read_errors: dict[int, str] = {}
    for i, path in enumerate(files):
        try:
            blobs.append(path.read_bytes())
        except OSError as exc:
            read_errors[i] = f"cannot read: {exc.strerror or exc}"
            blobs.append(b"")
    frame = predict(blobs)
    rows = []
    for i, (name, rec) in enumerate(zip(names, frame.to_dict(orient="records"), strict=True)):
        error = read_errors.get(i) or rec.get("error")
        ok = error is None or bool(pd.isna(error))
        rows.append(
            {
                "file": name,
                "class": rec["class"] if ok else "",
                "probability": f"{float(rec['probability']):.6f}" if ok else "",
                "error": "" if ok else str(error),
            }
        )
    return rows


def run_predict(
    images: Path,
    out: Path | None,
    model: str | None,
    root: Path | None,
    batch_size: int = 256,
    log: str | None = None,
    log_images: Path | None = None,
) -> PredictReport:
    """What `pipelines/predict.py` does: resolve the model (default: the configured dataset's champion),
    predict the folder, write `out` (default: `default_out`), append to the prediction `log` (None: none), say
    what happened and where on stderr."""
    from cnnpipe.config import load_config
    from cnnpipe.console import info, warn

    if not images.is_dir():  # before loading any model: the cheap mistakes first
        raise DataError(f"{images}: not a folder")
    if out is None:
        out = default_out(images, root)
        where = shown(out)
    else:
        where = str(out)  # as the user typed it
    if out.is_dir():
        raise DataError(f"{out}: is a folder; --out names the CSV file to write")
    local = model is not None and models_folder(model) is not None
    cfg = None if local or root is None else load_config([], root=root)
    model = model_or_champion(model, cfg)
    predict = load_predict_fn(model, cfg, root, log, log_images)
    report = predict_folder(images, predict, out, batch_size)
    info("predict", f"{report.images} image(s) -> {where} (model {model})")
    if log:
        info("predict", f"logged to {mask_secrets(log) if '://' in log else shown(Path(log))}")
    if report.unreadable:
        warn("predict", f"{report.unreadable} unreadable image(s): rows with an error in {where}")
    return report
