"""The monitor: the last window of a model's prediction log against the model's training reference.

Drift is decided by `monitoring.drift` (the tests and the one threshold), drawn by `monitoring.report`; this module
finds the model and its reference, reads the window, writes the report folder as a whole, logs an MLflow run in
the model's experiment and says the verdict. The command exits 1 on drift so that a scheduler can act on it."""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, ExitStack, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnpipe.atomic import atomic_dir
from cnnpipe.config import Config
from cnnpipe.errors import DataError
from cnnpipe.monitoring.drift import MIN_WINDOW, DriftResult, detect_drift
from cnnpipe.monitoring.prediction_log import DEFAULT_LOG, open_log
from cnnpipe.monitoring.reference import REFERENCE, Reference, load_reference
from cnnpipe.monitoring.report import write_report

REPORTS = Path("monitor") / "reports"  # default output: monitor/reports/<UTC time>/ in the project
DEFAULT_WINDOW = 500
DEFAULT_ALPHA = 0.01
ARTIFACT_PATH = "monitor"

if TYPE_CHECKING:
    from cnnpipe.tracking.runs import RunLogger


@dataclass
class MonitorReport:
    result: DriftResult
    out: Path
    run_id: str | None
    window: int
    skipped: int  # records of the model left out of the window: failed images, unknown classes


def model_reference(source: str, cfg: Config | None, root: Path | None, scratch: Path) -> tuple[Reference, str]:
    """The training reference of the model `source` names (as predict.py takes them), and where it came from."""
    from cnnpipe.serving.predict import is_model_uri

    folder = Path(source).expanduser()
    if not is_model_uri(source) and folder.is_dir():
        return load_reference(folder / REFERENCE), str(folder / REFERENCE)
    from cnnpipe.tracking.model_files import download_model_files
    from cnnpipe.tracking.registry import RUN_ID

    if not (is_model_uri(source) or RUN_ID.match(source)):
        raise DataError(f"{source}: not a models folder, a run id or a models:/ or runs:/ URI")
    if cfg is None or root is None:
        raise DataError(f"{source}: loading from MLflow needs a cnnpipe project (params.yaml) for the tracking URI")
    files = download_model_files(source, cfg.tracking.uri, root, scratch)
    path = files.folder / REFERENCE
    if not path.is_file():
        raise DataError(f"{source}: the model has no training reference (trained before cnnpipe kept one: retrain)")
    return load_reference(path), f"{source} ({REFERENCE})"


def window_sample(records: list[dict[str, Any]], ref: Reference) -> tuple[dict[str, np.ndarray], int]:
    """The log's records as the arrays `detect_drift` compares, and how many were left out: images that failed
    (no answer to compare), classes the model does not have, records without the image's size. Embeddings only
    when every record has the
    reference's K numbers (a log written without the reference's axes has none)."""
    index = {c: i for i, c in enumerate(ref.classes)}
    kept = [
        r for r in records if r.get("error") is None and r.get("class") in index and r.get("width") and r.get("height")
    ]
    sample: dict[str, np.ndarray] = {
        "brightness": np.array([float(r["brightness"]) for r in kept]),
        "contrast": np.array([float(r["contrast"]) for r in kept]),
        "width": np.array([int(r.get("width") or 0) for r in kept]),
        "height": np.array([int(r.get("height") or 0) for r in kept]),
        "confidence": np.array([float(r["probability"]) for r in kept]),
        "predicted": np.array([index[r["class"]] for r in kept], dtype=np.int64),
    }
    k = ref.sample["embedding"].shape[1] if "embedding" in ref.sample else None
    if k is not None and kept and all(isinstance(r.get("embedding"), list) and len(r["embedding"]) == k for r in kept):
        sample["embedding"] = np.array([r["embedding"] for r in kept], dtype=np.float64)
    return sample, len(records) - len(kept)


def reference_sample(ref: Reference) -> dict[str, np.ndarray]:
    return {
        **ref.sample,
        "size_min": np.asarray(ref.info["size_min"], dtype=np.int64),
        "size_max": np.asarray(ref.info["size_max"], dtype=np.int64),
    }


def default_out(root: Path | None, stamp: str) -> Path:
    return (root if root is not None else Path()) / REPORTS / stamp


def run_monitor(
    model: str | None,
    log: str | None,
    root: Path | None,
    last: int = DEFAULT_WINDOW,
    since: str | None = None,
    out: Path | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> MonitorReport:
    """What `pipelines/monitor.py` does; the caller exits 1 when `report.result.drift`."""
    from cnnpipe.config import load_config
    from cnnpipe.console import info, warn
    from cnnpipe.serving.predict import model_or_champion, shown

    if out is not None and out.exists():
        raise DataError(f"{out}: exists; --out names a new folder for the report")
    cfg = load_config([], root=root) if root is not None else None
    model = model_or_champion(model, cfg)
    dest = log or str((root if root is not None else Path()) / DEFAULT_LOG)
    prediction_log = open_log(dest)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-monitor-") as scratch:
        ref, ref_origin = model_reference(model, cfg, root, Path(scratch))
    model_run = ref.info.get("model_run")
    records = prediction_log.read(model_run, last, since)
    window, skipped = window_sample(records, ref)
    if len(window["confidence"]) < MIN_WINDOW:
        raise DataError(
            f"{prediction_log.where}: {len(window['confidence'])} usable prediction(s) of model run {model_run}"
            f"{f' since {since}' if since else ''}; the monitor needs at least {MIN_WINDOW}"
        )
    result = detect_drift(reference_sample(ref), window, len(ref.classes), alpha=alpha, class_names=ref.classes)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = out if out is not None else default_out(root, stamp)
    times = [str(r["time"]) for r in records if r.get("time")]
    heading = [
        f"Model: {model} (train run {model_run})",
        f"Reference: {ref.info.get('images')} images of the {ref.info.get('source')} ({ref_origin})",
        f"Prediction log: {prediction_log.where}",
        f"Window: {len(window['confidence'])} prediction(s), the last of the model's in the log"
        + (f", {times[0]} .. {times[-1]}" if times else "")
        + (f"; {skipped} left out (failed images or unknown classes)" if skipped else ""),
    ]
    with ExitStack() as stack:
        run = None
        if cfg is not None and root is not None:  # a models folder outside a project: the report only
            run = stack.enter_context(_monitor_run(cfg, root, model_run, model))
        with atomic_dir(target) as staging:
            write_report(staging, result, reference_sample(ref), window, ref.classes, heading)
            if run is not None:  # inside: a store that fails leaves no report without its run
                _log_result(run, result, staging, len(window["confidence"]), prediction_log.where)
    where = shown(target) if out is None else str(target)
    info("monitor", f"{len(window['confidence'])} prediction(s) of run {model_run} vs its reference: {result.verdict}")
    info("monitor", f"report: {where}/report.md" + (f"; MLflow run {run.run_id}" if run is not None else ""))
    for line in result.not_applicable:
        warn("monitor", line)
    return MonitorReport(result, target, None if run is None else run.run_id, len(window["confidence"]), skipped)


def _monitor_run(cfg: Config, root: Path, model_run: str | None, model: str) -> AbstractContextManager[RunLogger]:
    """The monitor's MLflow run, in the experiment of the model's train run (the configured one when the store
    does not have that run)."""
    from mlflow.exceptions import MlflowException

    from cnnpipe.tracking.names import experiment_name
    from cnnpipe.tracking.runs import connect, tracked_run
    from cnnpipe.tracking.tags import run_tags

    client, _ = connect(cfg.tracking.uri, root)
    experiment = experiment_name(cfg)
    if model_run:
        with suppress(MlflowException):
            experiment = client.get_experiment(client.get_run(model_run).info.experiment_id).name
    tags = {**run_tags(root, "monitor", cfg.data.name, ""), "cnnpipe.model": model, "cnnpipe.model_run": str(model_run)}
    return tracked_run(cfg.tracking.uri, root, experiment, "monitor", tags)


def _log_result(run: RunLogger, result: DriftResult, folder: Path, window: int, where: str) -> None:
    metrics = {"drift/any": float(result.drift), "drift/window": float(window)}
    for family, drifted in result.families.items():
        metrics[f"drift/{family}"] = float(drifted)
    for test in result.tests:
        key = f"{test.family}/{test.name}".replace(" ", "_")
        metrics[f"statistic/{key}"] = float(test.statistic)
        if test.p_value is not None:
            metrics[f"p/{key}"] = float(test.p_value)
    run.log_metrics(metrics, step=0)
    run.set_tags({"cnnpipe.drift": "yes" if result.drift else "no", "cnnpipe.prediction_log": where})
    for path in sorted(folder.iterdir()):
        run.log_artifact(path, ARTIFACT_PATH)
