"""The MLflow model registry: evaluate registers the train run's model, aliases pick the one to serve.

Aliases, not stages (deprecated in MLflow 3): `candidate` is the newest evaluated version, `champion` the best on
`tracking.champion_metric`. Each version carries its test metrics as tags (`test/acc`, ...), so deciding the
champion needs neither the old run nor its experiment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnpipe.errors import CnnpipeError
from cnnpipe.tracking.runs import connect
from cnnpipe.tracking.uri import mask_secrets

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
    client, _ = connect(configured_uri, project_root)
    model_id = logged_model_id(client, run_id)
    if model_id is None:
        return None
    tags = {METRIC_TAG.format(k): str(v) for k, v in metrics.items()} | {RUN_TAG: run_id}
    version = _existing_version(client, name, run_id)
    if version is None:
        version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    else:
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
    """The version already registered from this run (evaluate ran again): updated, not duplicated."""
    try:
        found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def _as_float(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def load_pyfunc(source: str, configured_uri: str | None, project_root: Path) -> Any:
    """An MLflow pyfunc model from `models:/name@alias`, `models:/name/version`, `models:/<model id>`,
    `runs:/<run id>/model`, or a bare train run id (its logged model). User errors name the source and store."""
    import mlflow.pyfunc

    client, uri = connect(configured_uri, project_root)
    where = mask_secrets(uri)
    try:
        if RUN_ID.match(source):
            model_id = logged_model_id(client, source)
            if model_id is None:
                raise CnnpipeError(f"run {source} in {where} has no logged model (was tracking.log_model false?)")
            source = f"models:/{model_id}"
        return mlflow.pyfunc.load_model(source)
    except MlflowException as exc:
        first = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
        raise CnnpipeError(f"{source}: cannot load the model from {where}: {first}") from None
