"""MLflow run lifecycle and logging. A run always ends FINISHED, FAILED or KILLED — never left RUNNING."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnpipe.tracking.uri import artifact_location, mask_secrets, resolve_tracking_uri

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call


def get_or_create_experiment(client: MlflowClient, name: str, artifact_uri: str) -> str:
    """Experiment id by name; created with artifacts under the project. Safe when two processes race."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_uri)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunLogger:
    """One MLflow run: params in batches, metrics batched per epoch (one call, not one per value)."""

    def __init__(self, client: MlflowClient, run_id: str, uri: str) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    def log_params(self, params: dict[str, Any], only_new: bool = False) -> None:
        """Log params; `only_new` skips keys the run already has (a reopened run: MLflow params are immutable)."""
        if only_new:
            existing = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in existing}
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000], synchronous=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def _param_value(value: Any) -> str:
    text = mask_secrets(str(value)) if isinstance(value, str) and "://" in value else str(value)
    return text[:MAX_PARAM_LEN]


def connect(configured_uri: str | None, project_root: Path) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(configured_uri, project_root)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri), uri


@contextmanager
def tracked_run(
    configured_uri: str | None,
    project_root: Path,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    reopen_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Start a run (the active fluent run too, for `log_model`) and end it with the right status:
    FINISHED on success, KILLED on Ctrl-C / SIGTERM, FAILED on any other exception.
    `reopen_run_id`: continue that run instead, if it still exists (a resumed sweep keeps its parent)."""
    client, uri = connect(configured_uri, project_root)
    exp_id = get_or_create_experiment(client, experiment, artifact_location(project_root, experiment))
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    run_id = _existing_run(client, reopen_run_id, exp_id)
    if run_id:
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield RunLogger(client, run_id, uri)
            status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        client.set_terminated(run_id, status=status)


def _existing_run(client: MlflowClient, run_id: str | None, experiment_id: str) -> str | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    ok = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
    return run_id if ok else None


def log_into_run(configured_uri: str | None, project_root: Path, run_id: str) -> RunLogger:
    """A logger for an existing (finished) run: `evaluate` adds test metrics to the train run."""
    client, uri = connect(configured_uri, project_root)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        from cnnpipe.errors import DataError

        raise DataError(f"MLflow run {run_id} not found in {mask_secrets(uri)}: {exc.message}") from None
    return RunLogger(client, run_id, uri)
