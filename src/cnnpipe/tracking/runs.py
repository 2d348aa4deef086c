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
from PIL import Image

from cnnpipe.console import warn
from cnnpipe.processes import owner_alive, owner_token
from cnnpipe.redact import mask_secrets
from cnnpipe.tracking.datasets import SplitInput, dataset_input
from cnnpipe.tracking.uri import artifact_location, resolve_tracking_uri

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch call
OWNER_TAG = "cnnpipe.owner"  # `host:pid:start` of the process the run is RUNNING in (cnnpipe.processes)
END_REASON_TAG = "cnnpipe.end_reason"  # why a run was closed by someone other than its own process
OPEN = ("RUNNING", "SCHEDULED")


# MLflow 3's UI asks which kind an untagged experiment is (GenAI or machine learning) and opens GenAI's pages for
# the former; the tag answers it: a model-training experiment, whose landing tab is Runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_uri: str) -> str:
    """Experiment id by name; created with artifacts under the project, tagged as model development. Safe when
    two processes race."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older cnnpipe, or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return exp.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=artifact_uri, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT}
        )
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

    def log_image(self, path: Path, key: str, step: int = 0) -> None:
        """A PNG as one of the run's keyed images (`key`, e.g. `eval/errors`): the MLflow UI shows keyed images
        in the run's page and side by side when runs are compared, which a plain artifact is not. Synchronous,
        so the image is stored when the stage exits."""
        with Image.open(path) as picture:
            self.client.log_image(self.run_id, picture.convert("RGB"), key=key, step=step, synchronous=True)

    def log_inputs(self, items: list[SplitInput], root: Path, attempts: int = 3) -> None:
        """The data splits this run read, as MLflow dataset inputs (the runs table's Dataset column).

        MLflow's SQL store looks a dataset up and inserts it if missing, in two steps: two runs logging the same
        new dataset at once (two trainings, a sweep's workers) can both insert, and one fails on the unique key.
        The retry finds the dataset the other run stored."""
        inputs = [dataset_input(item, root) for item in items]
        for attempt in range(attempts):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))


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
    _close_orphans(client, exp_id, tags.get("cnnpipe.stage", "mlflow"), keep=run_id)
    owner = owner_token()
    if run_id:
        client.set_tag(run_id, OWNER_TAG, owner)  # before RUNNING: nobody takes the reopened run for an orphan
        if END_REASON_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, END_REASON_TAG)
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags={**tags, OWNER_TAG: owner}).info.run_id
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            yield RunLogger(client, run_id, uri)
            status = RunStatus.to_string(RunStatus.FINISHED)
    except BaseException as exc:
        interrupt = interrupt_behind(exc)
        if interrupt is None:
            raise
        status = RunStatus.to_string(RunStatus.KILLED)
        if interrupt is not exc:  # a store write in the body's cleanup failed while Ctrl-C was on its way out
            warn(tags.get("cnnpipe.stage", "mlflow"), f"while stopping: {_first_line(exc)}")
            raise interrupt from None
        raise
    finally:
        _end_run(client, run_id, status, tags.get("cnnpipe.stage", "mlflow"))


def interrupt_behind(exc: BaseException) -> BaseException | None:
    """The Ctrl-C / SIGTERM (KeyboardInterrupt) `exc` is, or was raised while handling: an MLflow write in a
    `finally` that fails during an interrupt (SQLite: "database is locked") must not turn the interrupt into an
    ordinary error, which a sweep would count as one failed trial and carry on past."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__context__
    return None


def _end_run(client: MlflowClient, run_id: str, status: str, stage: str) -> None:
    """Mark the run ended. With an error on its way out (status not FINISHED), a store that refuses the write only
    warns: the error stays the one the user sees, and the next cnnpipe run in the experiment closes the run
    (`_close_orphans`: its owning process is gone by then)."""
    try:
        client.set_terminated(run_id, status=status)
    except MlflowException as exc:
        if status == RunStatus.to_string(RunStatus.FINISHED):
            raise
        warn(stage, f"MLflow run {run_id} could not be marked {status} ({_first_line(exc)}); the next run closes it")


def _first_line(exc: BaseException) -> str:
    text = mask_secrets(str(exc)).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def close_run(client: MlflowClient, run_id: str, reason: str, status: str = "KILLED", owner: str | None = None) -> bool:
    """End `run_id` with `status` and a `cnnpipe.end_reason` tag if it is still RUNNING (or SCHEDULED), wherever
    its process lives; True if this call closed it (False: already ended, deleted, not found, or, with `owner`,
    owned by another process now: a resume took it over)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status not in OPEN or (owner is not None and run.data.tags.get(OWNER_TAG) != owner):
        return False
    client.set_tag(run_id, END_REASON_TAG, reason)
    client.set_terminated(run_id, status=status)
    return True


def close_run_at(tracking_uri: str, run_id: str, reason: str) -> bool:
    """`close_run` against the store at `tracking_uri` (a sweep's recovery holds a URI, not a client)."""
    return close_run(MlflowClient(tracking_uri), run_id, reason)


def open_child_runs(tracking_uri: str, parent_run_id: str) -> list[tuple[str, dict[str, str]]]:
    """(run id, tags) of the RUNNING child runs of `parent_run_id` (a sweep's trials still marked as running)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    return [(r.info.run_id, dict(r.data.tags)) for r in runs]


def close_orphaned_runs(
    client: MlflowClient, experiment_id: str, stage: str | None = None, keep: str | None = None
) -> list[str]:
    """Close as KILLED (tagged `cnnpipe.end_reason`) the experiment's RUNNING runs, of `stage` if given, whose
    owner process (`cnnpipe.owner`) lived on this host and is dead; returns their ids. `keep`: a run not to touch."""
    filters = ["attributes.status = 'RUNNING'"] + ([f"tags.`cnnpipe.stage` = '{stage}'"] if stage else [])
    closed: list[str] = []
    page_token = None
    while True:
        page = client.search_runs([experiment_id], " AND ".join(filters), max_results=1000, page_token=page_token)
        for run in page:
            token = run.data.tags.get(OWNER_TAG)
            if run.info.run_id == keep or not token or owner_alive(token) is not False:
                continue  # no owner recorded (older runs), alive, or on another host: cannot tell, left alone
            reason = f"owner process {token} died (found by a later run)"
            if close_run(client, run.info.run_id, reason, owner=token):  # re-read: a resume may have taken it
                closed.append(run.info.run_id)
        page_token = page.token
        if not page_token:
            return closed


def _close_orphans(client: MlflowClient, experiment_id: str, stage: str, keep: str | None) -> None:
    """Every new run first closes the runs of its experiment left RUNNING by a process that died (SIGKILL, the
    OOM killer, power loss); one warning line each. A store error here never stops the stage."""
    try:
        closed = close_orphaned_runs(client, experiment_id, keep=keep)
    except MlflowException:
        return
    for run_id in closed:
        warn(stage, f"MLflow run {run_id} was left RUNNING by a process that died; marked KILLED")


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
