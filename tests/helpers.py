"""What tests share: project copies, stage and `dvc` runners, tiny images and models, servers, the trained
digits project. Fixtures live in tests/conftest.py; no test module imports another."""

from __future__ import annotations

import ast
import atexit
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnpipe.models.factory import build_model
from cnnpipe.models.store import save_model
from tests.tiny import conf_section

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
BIN = Path(sys.executable).parent


def imported_modules(tree: ast.AST, package: str = "") -> set[str]:
    """The absolute names of the modules the code `tree` imports, at any depth (function-level imports too): a
    `from m import x` may import the submodule m.x, so both m and m.x are named; relative imports are resolved
    against `package`, the package the code lives in. Read statically (tests/test_dvc_deps.py,
    tests/test_layers.py): an import-time check would miss the imports of code that did not run."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


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


_prepared: list[Path] = []  # the one prepared project of this pytest process, copied by every prepared_copy


def prepared_copy(dest: Path) -> Path:
    """`copy_project(dest)` with digits prepared and the train split passed through (`augment=none`). The two
    stages run once per test session; each call copies the result (a second instead of two stage processes)."""
    if not _prepared:
        built = Path(tempfile.mkdtemp(prefix="cnnpipe-prepared-"))
        atexit.register(shutil.rmtree, built, True)
        root = copy_project(built)
        for stage in ("prepare", "augment"):
            subprocess.run(
                [sys.executable, f"pipelines/{stage}.py", "augment=none"],
                cwd=root,
                env=stage_env(),
                check=True,
                capture_output=True,
            )
        _prepared.append(root)
    shutil.copytree(_prepared[0], dest, symlinks=True, dirs_exist_ok=True)
    return dest


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def process_state(pid: int) -> str:
    """The one-letter state of `pid` from /proc (R, S, T stopped, Z zombie...); "" when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2]


def signal_when(pid: int, ready: Callable[[], T | None], sig: int, timeout: float = 180.0, what: str = "it") -> T:
    """Send `sig` to `pid` at a moment `ready()` holds, with no race: `pid` is stopped (SIGSTOP, waited for until
    /proc says so) before `ready()` is checked again, so the state it saw (a trial running, say) cannot end before
    the signal is sent; then it is continued, and a caught signal (SIGINT, SIGTERM) is handled at once. Returns
    what `ready()` returned, which must be truthy when ready. `ready()` must only read (Optuna's journal and
    PostgreSQL reads take no lock the stopped process could hold). Fails at once if `pid` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_state(pid) in ("", "Z", "X"):
            pytest.fail(f"process {pid} ended before {what}")
        if ready():
            os.kill(pid, signal.SIGSTOP)
            try:
                while process_state(pid) not in ("T", "t", "", "Z", "X") and time.monotonic() < deadline:
                    time.sleep(0.01)
                found = ready()
                if found:
                    os.kill(pid, sig)
                    return found
            finally:
                with contextlib.suppress(ProcessLookupError):  # SIGKILL: gone already
                    os.kill(pid, signal.SIGCONT)
        time.sleep(0.2)
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


def isolated(project: Path, name: str) -> list[str]:
    """Overrides giving a sweep test its own study name, journal folder, sweep/ folder and MLflow store."""
    return [
        f"sweep.study_name={name}",
        f"paths.optuna=.optuna-{name}",
        f"paths.sweep=sweep-{name}",
        f"tracking.uri=sqlite:///{project / f'mlflow-{name}.db'}",
    ]


def names_key(message: str, key: str) -> bool:
    """`key` appears in `message` as a whole dotted name (`data.split` does not match `data.split.train`)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message) is not None


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([str(Path(sys.executable).parent / "dvc"), *args], cwd, check)


def compose_params(project: Path, *overrides: str) -> None:
    run([sys.executable, "-m", "cnnpipe.config", "compose", "--out", "params.yaml", *overrides], project)


# The default pipeline, shortened: one augmented copy, a 2-trial sweep of 2-3 epochs per trial (test acc > 0.8).
SHORT = ["augment.copies=1", "sweep.n_trials=2", "sweep.space.epochs.low=2", "sweep.space.epochs.high=3"]


MODEL = "cnnpipe-digits"


def build_trained_project(project: Path) -> Path:
    """The digits pipeline (prepare -> ... -> evaluate, registering `cnnpipe-digits` v1 as champion), reproduced
    in the empty folder `project`: conftest's session fixture `trained_project`, shared by the registry, serving,
    predict, transfer and UI tests. Tests that add models use their own registered model name or paths, so
    `cnnpipe-digits@champion` stays the pipeline's model."""
    copy_project(project)
    compose_params(project, *SHORT)
    dvc("repro", cwd=project)
    return project


def clone_project(src: Path, dest: Path) -> Path:
    """A copy of a built project that is a project of its own: files, git, DVC cache and the SQLite MLflow store,
    whose absolute artifact paths (experiments, runs, model versions, logged models) are rewritten to `dest`.
    Tests that change a pipeline (new params, `dvc exp run`) get one instead of rebuilding it (~1 minute)."""
    shutil.copytree(src, dest, symlinks=True)
    with sqlite3.connect(dest / "mlflow.db") as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            for column in db.execute(f"pragma table_info('{table}')").fetchall():
                name, kind = column[1], str(column[2]).upper()
                if "CHAR" in kind or "TEXT" in kind:
                    db.execute(
                        f'update "{table}" set "{name}" = replace("{name}", ?, ?) where instr("{name}", ?) > 0',
                        (str(src), str(dest), str(src)),
                    )
    return dest


def store(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def stage(project: Path, name: str, *overrides: str) -> str:
    """Run one stage entry in the project; its stderr (the [stage] lines)."""
    return run([sys.executable, f"pipelines/{name}.py", *overrides], project).stderr


def eval_metrics(project: Path, folder: str = "eval") -> dict[str, float]:
    return json.loads((project / folder / "metrics.json").read_text())["test"]


def tiny_model(folder: Path, channels: int = 1, classes: tuple[str, ...] = ("cat", "dog", "eel")) -> Path:
    """An untrained (seeded) CNN saved as models/ would be: preprocessing tests need no training."""
    spec = {
        "model": asdict(conf_section("model", channels=[4], convs_per_block=1, hidden=[8])),
        "in_shape": [channels, 8, 8],
        "classes": list(classes),
        "mean": [0.4] * channels,
        "std": [0.3] * channels,
        "input_size": 8,  # the preprocessing record (data/preprocess.py): stored as the network takes it
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    torch.manual_seed(0)
    save_model(folder, build_model(spec), spec)
    return folder


def png_bytes(pixels: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own process group, waited for with a bound, always killed (group and all)."""

    def __init__(self, cmd: list[str], ready_url: str, log: Path, env: dict[str, str], timeout: float = 90) -> None:
        self.cmd, self.ready_url, self.log, self.env, self.timeout = cmd, ready_url, log, env, timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.cmd[:3]} exited {self.proc.returncode}:\n{self.tail()}")
                try:
                    if requests.get(self.ready_url, timeout=2).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.3)
            raise AssertionError(f"{self.ready_url} not up after {self.timeout} s:\n{self.tail()}")
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""


def server_env(project: Path) -> dict[str, str]:
    """The stage environment (venv first on PATH: `mlflow models serve` execs `uvicorn` from PATH) + the store."""
    return {**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
