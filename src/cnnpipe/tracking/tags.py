"""Tags every run carries: where the code and data came from."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cnnpipe import __version__
from cnnpipe.tracking.names import dvc_tags


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_tags(root: Path) -> dict[str, str]:
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return {"cnnpipe.git_commit": "none"}
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    dirty = "true" if status else "false"
    return {"cnnpipe.git_commit": commit, "cnnpipe.git_dirty": dirty, "mlflow.source.git.commit": commit}


def run_tags(root: Path, stage: str, dataset: str, data_digest: str) -> dict[str, str]:
    return {
        "cnnpipe.stage": stage,
        "cnnpipe.dataset": dataset,
        "cnnpipe.data_digest": data_digest,
        "cnnpipe.version": __version__,
        **git_tags(root),
        **dvc_tags(),
    }
