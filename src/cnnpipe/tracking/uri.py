"""Where runs go: one function decides, so every stage, test and `make ui` agree."""

from __future__ import annotations

import os
import re
from pathlib import Path

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def store_root(project_root: Path) -> Path:
    """The folder that holds the store. DVC runs queued experiments in temporary copies of the repo
    (`.dvc/tmp/exps/...`): their runs belong in the original project's store, not the copy's."""
    root = project_root.resolve()
    parts = root.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def resolve_tracking_uri(configured: str | None, project_root: Path) -> str:
    """$MLFLOW_TRACKING_URI, else `tracking.uri`, else an SQLite file at the project root (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        return configured
    return f"sqlite:///{store_root(project_root) / DB_NAME}"


def artifact_location(project_root: Path, experiment: str) -> str:
    """Artifacts under the project (absolute file URI), never MLflow's cwd-relative `./mlruns`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    return (store_root(project_root) / ARTIFACTS_DIR / safe).as_uri()


def mask_secrets(uri: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host`, for anything logged or printed."""
    return re.sub(r"(://[^/:@]*:)[^/@]+@", r"\1***@", uri)
