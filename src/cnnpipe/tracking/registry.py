"""The MLflow model registry: evaluate registers the train run's model, aliases pick the one to serve.

Aliases, not stages (deprecated in MLflow 3): `candidate` is the newest evaluated version, `champion` the best on
`tracking.champion_metric`. Each version carries its test metrics as tags (`test/acc`, ...), so deciding the
champion needs neither the old run nor its experiment.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnpipe.errors import CnnpipeError
from cnnpipe.redact import mask_secrets
from cnnpipe.tracking.runs import connect

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the versions are still de-duplicated after registering)
    fcntl = None  # type: ignore[assignment]

CANDIDATE, CHAMPION = "candidate", "champion"
METRIC_TAG = "test/{}"  # version tag per test metric, as the run's metric names
RUN_TAG = "cnnpipe.run_id"
LOGGED_MODEL_NAME = "model"  # what the train stage logs (`log_image_model`)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Registration:
    name: str
    version: str
    champion: bool  # the new version holds `champion` now
    previous_champion: str | None
    reason: str  # one line: why champion moved or stayed


def registered_model_name(configured: str | None, dataset: str) -> str:
    return configured or f"cnnpipe-{dataset}"


def logged_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The newest model the train stage logged in `run_id`, or None (tracking.log_model=false)."""
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{LOGGED_MODEL_NAME}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return models[0].model_id if models else None


def register_run_model(
    configured_uri: str | None,
    project_root: Path,
    run_id: str,
    name: str,
    metrics: dict[str, float],
    champion_metric: str,
    champion_mode: str,
) -> Registration | None:
    """Register (or, for a re-evaluated run, update) the run's model as a version of `name`, tag it with
    `metrics`, point `candidate` at it, and move `champion` to it when it beats the current champion on
    `champion_metric` (higher for mode max, lower for min; a tie keeps the champion). None: no logged model."""
    client, uri = connect(configured_uri, project_root)
    with _store_lock(uri):  # two evaluations at once on a local store: one registers, the other finds it
        return _register(client, run_id, name, metrics, champion_metric, champion_mode)


def _register(
    client: MlflowClient,
    run_id: str,
    name: str,
    metrics: dict[str, float],
    champion_metric: str,
    champion_mode: str,
) -> Registration | None:
    model_id = logged_model_id(client, run_id)
    if model_id is None:
        return None
    tags = {METRIC_TAG.format(k): str(v) for k, v in metrics.items()} | {RUN_TAG: run_id}
    version = _existing_version(client, name, run_id)
    if version is None:
        registered = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
        # A server (no lock across hosts) may have let another evaluation register this run too: keep one.
        version = _one_version_per_run(client, name, run_id, registered)
        fresh = str(version.version) == str(registered.version)
    else:
        fresh = False
    if not fresh:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version.version), key, value)
    number = str(version.version)
    client.set_registered_model_alias(name, CANDIDATE, number)

    current = version_by_alias(client, name, CHAMPION)
    new_score = metrics[champion_metric]
    if current is None:
        wins, reason = True, "there was no champion"
    elif str(current.version) == number:
        wins, reason = True, "it already was the champion"
    else:
        old = current.tags.get(METRIC_TAG.format(champion_metric))
        old_score = _as_float(old)
        if old_score is None:
            wins = False
            reason = f"champion v{current.version} has no {METRIC_TAG.format(champion_metric)} tag to compare; kept"
        else:
            wins = new_score > old_score if champion_mode == "max" else new_score < old_score
            verb = "beats" if wins else "does not beat"
            reason = f"test/{champion_metric} {new_score:.4f} {verb} champion v{current.version}'s {old_score:.4f}"
    if wins:
        client.set_registered_model_alias(name, CHAMPION, number)
    return Registration(name, number, wins, str(current.version) if current else None, reason)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points at, or None (read from the model's alias map: a missing alias is
    not an error, and MLflow's error codes for it differ between stores)."""
    version = client.get_registered_model(name).aliases.get(alias)
    return client.get_model_version(name, str(version)) if version is not None else None


def _existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version already registered from this run (evaluate ran again): updated, not duplicated. The lowest,
    should there be several (what `_one_version_per_run` keeps)."""
    try:
        found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def _one_version_per_run(client: MlflowClient, name: str, run_id: str, registered: ModelVersion) -> ModelVersion:
    """After registering: if concurrent evaluations registered the run more than once, keep the lowest version
    (every process agrees on it: numbers only grow) and delete the others, moving any alias they hold to it."""
    found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    if not found:
        return registered
    keep = min(found, key=lambda v: int(v.version))
    extra = {str(v.version) for v in found if int(v.version) > int(keep.version)}
    if extra:
        for alias, number in client.get_registered_model(name).aliases.items():
            if str(number) in extra:
                client.set_registered_model_alias(name, alias, str(keep.version))
        for number in sorted(extra):
            with suppress(MlflowException):  # the other evaluation deleted it first
                client.delete_model_version(name, number)
    return keep


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive flock beside a local store (SQLite file or file store folder); nothing for a server, where
    `_one_version_per_run` mends a race after the fact."""
    path = local_store_path(uri)
    if fcntl is None or path is None:
        yield
        return
    lock = path / ".cnnpipe-registry.lock" if path.is_dir() else path.with_name(f"{path.name}-cnnpipe-registry.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only place: no lock
        yield
        return
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def local_store_path(uri: str) -> Path | None:
    """The SQLite file or file-store folder behind a local tracking URI; None for a server or another database."""
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :].split("?", 1)[0]
        return Path(db) if db and db != ":memory:" else None
    if uri.startswith("file:"):
        path = Path(urlparse(uri).path)
    elif "://" not in uri:
        path = Path(uri)
    else:
        return None
    return path if path.is_dir() else None


def _as_float(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def loadable_uri(client: MlflowClient, source: str, where: str) -> str:
    """`source` as a URI MLflow loads: a bare train run id becomes its logged model's `models:/<model id>`."""
    if not RUN_ID.match(source):
        return source
    model_id = logged_model_id(client, source)
    if model_id is None:
        raise CnnpipeError(f"run {source} in {where} has no logged model (was tracking.log_model false?)")
    return f"models:/{model_id}"


def load_failure(source: str, where: str, exc: MlflowException) -> CnnpipeError:
    """MLflow's refusal to load `source` as one line naming the source and the store."""
    first = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
    return CnnpipeError(f"{source}: cannot load the model from {where}: {first}")


def load_pyfunc(source: str, configured_uri: str | None, project_root: Path) -> Any:
    """An MLflow pyfunc model from `models:/name@alias`, `models:/name/version`, `models:/<model id>`,
    `runs:/<run id>/model`, or a bare train run id (its logged model). User errors name the source and store."""
    import mlflow.pyfunc

    client, uri = connect(configured_uri, project_root)
    where = mask_secrets(uri)
    try:
        source = loadable_uri(client, source, where)
        return mlflow.pyfunc.load_model(source)
    except MlflowException as exc:
        raise load_failure(source, where, exc) from None


def model_version(source: str, configured_uri: str | None, project_root: Path) -> str | None:
    """The registered version `source` names (`models:/name@alias`, `models:/name/version`), else None."""
    client, _ = connect(configured_uri, project_root)
    try:
        return registry_version(client, source)
    except MlflowException:
        return None


def registry_version(client: MlflowClient, source: str) -> str | None:
    """The registered version `source` names (`models:/name@alias` or `models:/name/version`), else None."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", source)
    if match is None:
        return None
    name, alias, number = match.groups()
    if number is not None:
        return number
    return str(client.get_model_version_by_alias(name, alias).version)
