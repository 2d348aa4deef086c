"""Shared fixtures. Tests make their own tiny data; nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock

from tests.helpers import PG_ADMIN, build_trained_project, clone_project, postgres_up

# Everything in tests runs on the CPU with few threads: the machine has 2 cores.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: each one's in-process torch gets one thread (an OpenMP team on a core
    # another worker uses waits for it at every operator; see cnnpipe/threads.py). Stage subprocesses get
    # OMP_NUM_THREADS=1 from helpers.stage_env.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests pick their own MLflow store; a user's MLFLOW_TRACKING_URI must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for in-process fits (the machine has 2 cores; pytest-xdist or a neighbour may share)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seeded_one_thread(one_thread: None) -> None:
    """`one_thread`, and torch's global generator seeded: tests that build models draw the same weights each run."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get on first use, or the test is skipped saying why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed, and installing it needs apt-get as root (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=120", "install", "-y", "--no-install-recommends", "chromium"]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=300)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    found = shutil.which("chromium")
    if not found:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"chromium could not be installed (apt-get install chromium: {reason})")
    return found


@pytest.fixture(scope="session")
def _built_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shortened digits pipeline, reproduced once per test run (helpers.build_trained_project), and a copy
    of it taken before any test touches it. Under pytest-xdist the first worker to ask builds it in the run's
    shared temporary folder, holding a file lock; every worker then works on a clone of its own (a second
    process writing the same SQLite store or registry would race)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        project = build_trained_project(tmp_path_factory.mktemp("trained") / "project")
        return project, clone_project(project, tmp_path_factory.mktemp("pristine") / "project")
    shared = tmp_path_factory.getbasetemp().parent / "built-pipeline"
    failed = shared.with_name("built-pipeline.failed")  # one worker's failed build fails the others at once
    with FileLock(f"{shared}.lock", timeout=1800):  # a flock: released if its worker dies
        if failed.is_file():
            pytest.fail(f"the shared pipeline build failed in another worker:\n{failed.read_text()[-3000:]}")
        if not (shared / "done").is_file():
            try:
                build_trained_project(shared / "project")
            except BaseException as exc:
                failed.write_text(f"{type(exc).__name__}: {exc}")
                raise
            (shared / "done").touch()
    project = clone_project(shared / "project", tmp_path_factory.mktemp("trained") / "project")
    return project, clone_project(shared / "project", tmp_path_factory.mktemp("pristine") / "project")


@pytest.fixture(scope="session")
def trained_project(_built_project: tuple[Path, Path]) -> Path:
    """The built pipeline, shared by tests that read it and add only models of their own names or paths."""
    return _built_project[0]


@pytest.fixture
def fresh_trained_project(_built_project: tuple[Path, Path], tmp_path: Path) -> Path:
    """A project of its own, as the pipeline left it: for tests that change params, outputs or the registry."""
    return clone_project(_built_project[1], tmp_path / "project")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database of its own (the local server, trust auth), dropped afterwards; the test
    is skipped when no PostgreSQL answers."""
    if not postgres_up():
        pytest.skip("no PostgreSQL answers at 127.0.0.1:5432")
    import sqlalchemy as sa

    db = f"cnnpipe_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {db}"))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{db}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        admin.dispose()
