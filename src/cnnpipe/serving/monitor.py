"""The monitor: the last window of a model's prediction log against the model's training reference.

Drift is decided by `monitoring.drift` (the tests and the one threshold), drawn by `monitoring.report`; this module
finds the model and its reference, reads the window, writes the report folder as a whole, logs an MLflow run in
the model's experiment and says the verdict. The command exits 1 on drift so that a scheduler can act on it."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import AbstractContextManager, ExitStack, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnpipe.config import Config
from cnnpipe.errors import DataError
from cnnpipe.monitoring.drift import MIN_WINDOW, DriftResult, detect_drift
from cnnpipe.monitoring.prediction_log import DEFAULT_LOG, log_time, open_log
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
    from cnnpipe.serving.predict import mlflow_project, models_folder

    folder = models_folder(source)
    if folder is not None:
        return load_reference(folder / REFERENCE), str(folder / REFERENCE)
    from cnnpipe.tracking.model_files import download_model_files

    cfg, root = mlflow_project(source, cfg, root)
    files = download_model_files(source, cfg.tracking.uri, root, scratch)
    path = files.folder / REFERENCE
    if not path.is_file():
        raise DataError(f"{source}: the model has no training reference (trained before cnnpipe kept one: retrain)")
    return load_reference(path), f"{source} ({REFERENCE})"


def window_sample(records: list[dict[str, Any]], ref: Reference) -> tuple[dict[str, np.ndarray], int]:
    """The log's records as the arrays `detect_drift` compares, and how many were left out: images that failed
    (no answer to compare), classes the model does not have, records with a missing or non-numeric field (a log
    edited or written by something else). Embeddings only when every kept record has the reference's K numbers
    (a log written without the reference's axes has none)."""
    index = {c: i for i, c in enumerate(ref.classes)}
    k = ref.sample["embedding"].shape[1] if "embedding" in ref.sample else None
    rows: list[tuple[float, float, int, int, float, int, Any]] = []
    for r in records:
        if r.get("error") is not None or r.get("class") not in index:
            continue
        try:
            row = (
                float(r["brightness"]),
                float(r["contrast"]),
                int(r["width"]),
                int(r["height"]),
                float(r["probability"]),
                index[r["class"]],
                r.get("embedding"),
            )
        except (KeyError, TypeError, ValueError):
            continue
        if row[2] < 1 or row[3] < 1 or not all(np.isfinite(row[:2] + row[4:5])):
            continue
        rows.append(row)
    columns = list(zip(*rows, strict=True)) if rows else [()] * 7
    sample: dict[str, np.ndarray] = {
        "brightness": np.array(columns[0], dtype=np.float64),
        "contrast": np.array(columns[1], dtype=np.float64),
        "width": np.array(columns[2], dtype=np.int64),
        "height": np.array(columns[3], dtype=np.int64),
        "confidence": np.array(columns[4], dtype=np.float64),
        "predicted": np.array(columns[5], dtype=np.int64),
    }
    embeddings = columns[6]
    if k is not None and rows and all(isinstance(e, list) and len(e) == k for e in embeddings):
        with suppress(TypeError, ValueError):  # non-numeric entries: no embedding test, said in the report
            sample["embedding"] = np.array(embeddings, dtype=np.float64)
    return sample, len(records) - len(rows)


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
    last: int | None = DEFAULT_WINDOW,
    since: str | None = None,
    out: Path | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> MonitorReport:
    """What `pipelines/monitor.py` does; the caller exits 1 when `report.result.drift`. The window: the model's
    `last` records (None: all) at or after `since` (an ISO time; None: any)."""
    from mlflow.exceptions import MlflowException

    from cnnpipe.config import load_config
    from cnnpipe.console import info, warn
    from cnnpipe.serving.predict import model_or_champion, shown

    if out is not None and out.exists():  # the cheap mistakes first
        raise DataError(f"{out}: exists; --out names a new folder for the report")
    since = None if since is None else log_time(since)
    cfg = load_config([], root=root) if root is not None else None
    model = model_or_champion(model, cfg)
    prediction_log = open_log(log or str((root if root is not None else Path()) / DEFAULT_LOG))
    with tempfile.TemporaryDirectory(prefix="cnnpipe-monitor-") as scratch:
        ref, ref_origin = model_reference(model, cfg, root, Path(scratch))
    model_run = ref.info.get("model_run")
    if not model_run:  # read(None) would take every model's records
        raise DataError(f"{ref_origin}: the reference names no model run; cannot tell its predictions from others'")
    records = prediction_log.read(model_run, last, since)
    window, skipped = window_sample(records, ref)
    size = len(window["confidence"])
    span = f"{records[0].get('time')} .. {records[-1].get('time')}" if records else "none"
    chosen = (f"the last {last}" if last is not None else "all") + (f" since {since}" if since else "")
    if size < MIN_WINDOW:
        raise DataError(
            f"{prediction_log.where}: {size} usable prediction(s) of model run {model_run} ({chosen} records); "
            f"the monitor needs at least {MIN_WINDOW}"
        )
    reference = reference_sample(ref)
    result = detect_drift(reference, window, len(ref.classes), alpha=alpha, class_names=ref.classes)
    heading = [
        f"Model: {model} (train run {model_run})",
        f"Reference: {ref.info.get('images')} images of the {ref.info.get('source')} ({ref_origin})",
        f"Prediction log: {prediction_log.where}",
        f"Window: {size} prediction(s) ({chosen} of the model's records; times {span})"
        + (f"; {skipped} left out (failed images, unknown classes, incomplete records)" if skipped else ""),
    ]
    target = claim_folder(out, root)
    try:
        with ExitStack() as stack:
            run = None
            if cfg is not None and root is not None:  # a models folder outside a project: the report only
                run = stack.enter_context(_monitor_run(cfg, root, model_run, model))
                run.log_params(
                    {"alpha": alpha, "last": last, "since": since, "size_share": result.size_share, "log": dest(log)}
                )
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            stack.callback(shutil.rmtree, staging, ignore_errors=True)
            write_report(staging, result, reference, window, ref.classes, heading)
            if run is not None:  # before the folder lands: a store that fails leaves no report without its run
                _log_result(run, result, staging, size, prediction_log.where, span)
            os.replace(staging, target)  # onto the empty folder claimed above
    except MlflowException as exc:
        raise DataError(f"MLflow: {str(exc.message).strip().splitlines()[0]}; no report written") from None
    finally:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # the empty folder claimed above, when nothing landed in it
    where = shown(target) if out is None else str(target)
    info("monitor", f"{size} prediction(s) of run {model_run} vs its reference: {result.verdict}")
    info("monitor", f"report: {where}/report.md" + (f"; MLflow run {run.run_id}" if run is not None else ""))
    for line in result.not_applicable:
        warn("monitor", line)
    return MonitorReport(result, target, None if run is None else run.run_id, size, skipped)


def dest(log: str | None) -> str:
    """The log as a param: masked when a database URL."""
    from cnnpipe.redact import mask_secrets

    return "default (monitor/predictions.jsonl)" if log is None else mask_secrets(log)


def claim_folder(out: Path | None, root: Path | None) -> Path:
    """The report's folder, created empty now so that no other monitor can write it: `out`, refused when it exists;
    else monitor/reports/<UTC time>, with -2, -3, ... when another monitor took that second."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            out.mkdir()
        except FileExistsError:
            raise DataError(f"{out}: exists; --out names a new folder for the report") from None
        return out
    base = default_out(root, datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise DataError(f"{base.parent}: a thousand reports in one second; give --out")


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


def _log_result(run: RunLogger, result: DriftResult, folder: Path, window: int, where: str, span: str) -> None:
    metrics = {"drift/any": float(result.drift), "drift/window": float(window)}
    for family, drifted in result.families.items():
        metrics[f"drift/{family}"] = float(drifted)
    for test in result.tests:
        key = f"{test.family}/{test.name}".replace(" ", "_")
        metrics[f"statistic/{key}"] = float(test.statistic)
        if test.p_value is not None:
            metrics[f"p/{key}"] = float(test.p_value)
    run.log_metrics(metrics, step=0)
    run.set_tags(
        {"cnnpipe.drift": "yes" if result.drift else "no", "cnnpipe.prediction_log": where, "cnnpipe.window": span}
    )
    for path in sorted(folder.iterdir()):
        run.log_artifact(path, ARTIFACT_PATH)
