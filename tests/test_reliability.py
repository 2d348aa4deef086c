"""Interruption, resume, divergence, concurrency and reproducibility — with real processes and stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, needs_postgres, prepared_copy, stage_env

pytestmark = pytest.mark.slow

# Fast training: the prepared train split as is, params.yaml values (no sweep).
FAST = ["augment=none", "train.hparams=params"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_copy(tmp_path_factory.mktemp("reliability"))


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "pipelines/train.py", *FAST, *overrides]


def train(project: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_cmd(*overrides), cwd=project, env=env or stage_env(), capture_output=True, text=True, timeout=600
    )


def store(project: Path, name: str) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{project / f'mlflow-{name}.db'}"
    return f"tracking.uri={uri}", MlflowClient(uri)


def train_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("cnnpipe-digits")
    return client.search_runs([exp.experiment_id], filter_string="tags.`cnnpipe.stage` = 'train'")


def wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_sigterm_marks_run_killed_and_resume_continues_the_same_run(project: Path) -> None:
    uri, client = store(project, "resume")
    ckpt_root = "paths.checkpoints=ckpt-resume"
    models = "paths.models=models-resume"
    args = (uri, ckpt_root, models, "train.epochs=30", "optim.scheduler=cosine")
    proc = subprocess.Popen(
        train_cmd(*args), cwd=project, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(
        lambda: any((project / "ckpt-resume").rglob("last.ckpt")) or proc.poll() is not None,
        what="the first checkpoint",
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "cnnpipe train: interrupted" in err
    (killed,) = train_runs(client)
    assert killed.info.status == "KILLED"
    assert not (project / "models-resume" / "model.safetensors").exists()  # nothing half-written
    done_before = len(client.get_metric_history(killed.info.run_id, "val/acc"))
    assert 1 <= done_before < 30

    resumed = train(project, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming MLflow run {killed.info.run_id}" in resumed.stderr
    (run,) = train_runs(client)  # the same run, not a new one
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")]
    assert sorted(set(steps)) == list(range(1, 31))
    history = (project / "models-resume" / "history.csv").read_text().splitlines()
    assert len(history) == 31  # every epoch, from before and after the interruption
    assert json.loads((project / "models-resume" / "run.json").read_text())["run_id"] == run.info.run_id
    assert not any((project / "ckpt-resume").rglob("last.ckpt"))  # cleaned up after success


def test_resume_never_starts_a_new_run(project: Path) -> None:
    uri, client = store(project, "never")
    args = (uri, "paths.checkpoints=ckpt-never", "paths.models=models-never", "train.epochs=2")
    folder = project / "ckpt-never" / "stale" / "lightning"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"not a checkpoint")
    assert train(project, *args, "train.resume=never").returncode == 0
    assert len(train_runs(client)) == 1


def test_nan_loss_stops_with_one_line_and_a_failed_run(project: Path) -> None:
    uri, client = store(project, "nan")
    proc = train(
        project,
        uri,
        "paths.checkpoints=ckpt-nan",
        "paths.models=models-nan",
        "optim=sgd",
        "optim.lr=1e12",
        "optim.scheduler=none",
        "train.epochs=3",
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("cnnpipe train: error: train/loss is nan")
    (run,) = train_runs(client)
    assert run.info.status == "FAILED"
    assert not (project / "models-nan" / "model.safetensors").exists()


def test_two_trainings_at_once_on_the_sqlite_store(project: Path) -> None:
    uri, client = store(project, "concurrent")
    procs = [
        subprocess.Popen(
            train_cmd(uri, f"paths.checkpoints=ckpt-c{i}", f"paths.models=models-c{i}", "train.epochs=3", f"seed={i}"),
            cwd=project,
            env=stage_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    runs = train_runs(client)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "val/acc")) == 3


def test_same_seed_deterministic_gives_identical_results(project: Path) -> None:
    """Two train + evaluate runs with the same seed: identical weights and test metrics. In-process (the
    stages' own functions), as process start-up would double the test's time."""
    from cnnpipe.config import load_config
    from cnnpipe.stages.evaluate import run_evaluation
    from cnnpipe.stages.train import run_training

    uri, client = store(project, "determinism")
    results = []
    for i in range(2):
        args = [
            *FAST,
            uri,
            f"paths.models=models-det{i}",
            f"paths.eval=eval-det{i}",
            "paths.checkpoints=ckpt-det",
            "train.epochs=2",
            "train.deterministic=true",
            "trainer.threads=1",
        ]
        cfg = load_config(args, root=project)
        run_training(cfg, project)
        run_evaluation(cfg, project)
        results.append(
            (
                (project / f"models-det{i}" / "model.safetensors").read_bytes(),
                json.loads((project / f"eval-det{i}" / "metrics.json").read_text()),
            )
        )
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert {r.info.status for r in train_runs(client)} == {"FINISHED"}


@needs_postgres
def test_two_trainings_at_once_against_an_mlflow_server_on_postgresql(
    project: Path, tmp_path: Path, pg_url: str
) -> None:
    port = free_port()
    env = {**stage_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            pg_url,
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        def healthy() -> bool:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited: {server.stderr.read()[-2000:]}")
            try:
                return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(healthy, timeout=120, what="the MLflow server")
        client_env = {**stage_env(), "MLFLOW_TRACKING_URI": url}
        procs = [
            subprocess.Popen(
                train_cmd(
                    f"paths.checkpoints=ckpt-s{i}",
                    f"paths.models=models-s{i}",
                    "train.epochs=2",
                    f"seed={i}",
                    "tracking.log_model=false",
                ),
                cwd=project,
                env=client_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errors
        client = MlflowClient(url)
        runs = train_runs(client)
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
        assert all(len(client.get_metric_history(r.info.run_id, "val/loss")) == 2 for r in runs)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
