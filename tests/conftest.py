"""Shared fixtures. Tests make their own tiny data; nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Everything in tests runs on the CPU with few threads: the machine has 2 cores.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests pick their own MLflow store; a user's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def copy_project(dest: Path) -> Path:
    """A copy of the project's tracked sources (no outputs, no store), as a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("data/", "models/", "eval/", "mlflow.db")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def prepared_copy(dest: Path) -> Path:
    """`copy_project(dest)` with digits prepared and the train split passed through (`augment=none`)."""
    root = copy_project(dest)
    for stage in ("prepare", "augment"):
        subprocess.run(
            [sys.executable, f"pipelines/{stage}.py", "augment=none"],
            cwd=root,
            env=stage_env(),
            check=True,
            capture_output=True,
        )
    return root


def stage_env() -> dict[str, str]:
    """Environment for stage subprocesses: the venv first on PATH (DVC runs `python ...`), few threads."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 12, seed: int = 0) -> Path:
    """Class folders of small PNGs, each class a distinct bright square position: easy to learn."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        for i in range(per_class):
            img = (rng.random((size, size)) * 40).astype(np.uint8)
            r0 = (c * 4) % (size - 4)
            img[r0 : r0 + 4, 2:10] = 230
            write_png(root / f"class_{c}" / f"img_{i}.png", img)
    return root


# Helpers for tests that run real stage processes against a real MLflow store (tests/test_concurrency.py,
# tests/test_orphans.py). Fast training: the prepared train split as is, params.yaml values, one torch thread.
FAST_TRAIN = ["augment=none", "train.hparams=params", "trainer.threads=1"]


def stage_cmd(stage: str, *overrides: str) -> list[str]:
    """`python pipelines/<stage>.py ...` (train gets FAST_TRAIN first)."""
    return [sys.executable, f"pipelines/{stage}.py", *(FAST_TRAIN if stage == "train" else []), *overrides]


def run_stage_process(project: Path, stage: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        stage_cmd(stage, *overrides), cwd=project, env=stage_env(), capture_output=True, text=True, timeout=600
    )


def start_stage_process(project: Path, stage: str, *overrides: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        stage_cmd(stage, *overrides),
        cwd=project,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def sqlite_store(project: Path, name: str) -> tuple[str, str]:
    """(`tracking.uri=...` override, the URI) of an SQLite store of its own in the project."""
    uri = f"sqlite:///{project / f'mlflow-{name}.db'}"
    return f"tracking.uri={uri}", uri


def stage_runs(client, stage: str = "train", experiment: str = "cnnpipe-digits") -> list:
    """The experiment's runs of one stage (tag `cnnpipe.stage`); [] while the experiment does not exist."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`cnnpipe.stage` = '{stage}'")


def poll(predicate, timeout: float = 120.0, what: str = "condition", every: float = 0.2) -> None:
    """Wait until `predicate()` is true; fail the test after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"  # the local PostgreSQL (trust auth), every session and CI


def postgres_up() -> bool:
    try:
        import sqlalchemy as sa

        with sa.create_engine(PG_ADMIN).connect() as conn:
            conn.execute(sa.text("select 1"))
        return True
    except Exception:
        return False


needs_postgres = pytest.mark.skipif(not postgres_up(), reason="no PostgreSQL answers at 127.0.0.1:5432")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for in-process fits (the machine has 2 cores; pytest-xdist or a neighbour may share)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def isolated(project: Path, name: str) -> list[str]:
    """Overrides giving a sweep test its own study name, journal folder, sweep/ folder and MLflow store."""
    return [
        f"sweep.study_name={name}",
        f"paths.optuna=.optuna-{name}",
        f"paths.sweep=sweep-{name}",
        f"tracking.uri=sqlite:///{project / f'mlflow-{name}.db'}",
    ]
