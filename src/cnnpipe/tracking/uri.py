"""Where runs go: one function decides, so every stage, test and `make ui` agree."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cnnpipe.config import store_root

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def resolve_tracking_uri(configured: str | None, project_root: Path) -> str:
    """`tracking.uri` when set (what the user asked for), else $MLFLOW_TRACKING_URI, else an SQLite file at the
    project root (absolute)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root(project_root) / DB_NAME}"


def artifact_location(project_root: Path, experiment: str) -> str:
    """Artifacts under the project (absolute file URI), never MLflow's cwd-relative `./mlruns`."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
    return (store_root(project_root) / ARTIFACTS_DIR / safe).as_uri()
