"""torch CPU threads (`cnnpipe.threads`, issue #15 item 5): the automatic count leaves one core to other
processes and shares the rest among the processes the project starts (sweep workers, DDP ranks); an explicit
`trainer.threads` or OMP_NUM_THREADS is used as given. The slow tests check real worker and rank processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cnnpipe.threads import cpu_threads
from tests.tiny import tiny_config as config

SetCores = Callable[[int], None]


@pytest.fixture
def cores(monkeypatch: pytest.MonkeyPatch) -> SetCores:
    """Pretend this process may run on `n` cores; no thread setting in the environment."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 2 * n)  # the machine may have more than we may use

    return set_cores


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_one_process_leaves_one_core_to_others(cores: SetCores) -> None:
    for n, expected in ((1, 1), (2, 1), (4, 3), (16, 15)):
        cores(n)
        assert cpu_threads(config()) == expected, n


def test_sweep_workers_share_the_cores(cores: SetCores) -> None:
    cores(2)
    assert cpu_threads(config("sweep.workers=2"), processes=2) == 1
    cores(8)
    assert cpu_threads(config("sweep.workers=2"), processes=2) == 3
    assert cpu_threads(config("sweep.workers=4"), processes=4) == 1


def test_ddp_ranks_share_the_cores(cores: SetCores, monkeypatch: pytest.MonkeyPatch) -> None:
    cores(2)
    assert cpu_threads(config("trainer.devices=2", "trainer.strategy=ddp")) == 1
    cores(8)
    assert cpu_threads(config("trainer.devices=2", "trainer.strategy=ddp")) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "7")  # torchrun's count of processes on this node wins
    assert cpu_threads(config()) == 1


def test_explicit_settings_are_used_as_given(cores: SetCores, monkeypatch: pytest.MonkeyPatch) -> None:
    cores(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(config("trainer.threads=3")) == 3  # trainer.threads first
    assert cpu_threads(config("trainer.threads=3", "sweep.workers=2"), processes=2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(config()) == 2  # then the environment's
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert cpu_threads(config()) == 1  # not a number: automatic


def test_the_environment_caps_the_share_of_several_processes(cores: SetCores, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cores(2)
    assert cpu_threads(config("sweep.workers=2"), processes=2) == 1  # 2 workers x 2 threads would collide
    cores(16)
    assert cpu_threads(config("sweep.workers=2"), processes=2) == 2  # within the share of 7: as given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default
    assert cpu_threads(config()) == 1


def test_building_the_trainer_sets_torch_threads(cores: SetCores, torch_threads: None) -> None:
    from cnnpipe.training.trainer import build_trainer

    cores(2)
    torch.set_num_threads(2)
    build_trainer(config(), [])
    assert torch.get_num_threads() == 1
    build_trainer(config("trainer.threads=2"), [])
    assert torch.get_num_threads() == 2


def test_sweep_workers_get_their_share_in_env_and_config(cores: SetCores, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_spawn_workers` hands each worker process its share, before it imports torch (OMP_NUM_THREADS)."""
    from cnnpipe.tuning import pool

    seen: list[tuple[str, int]] = []

    class FakeWorker:
        def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
            tree = yaml.safe_load(Path(cmd[cmd.index("--config") + 1]).read_text())
            seen.append((env["OMP_NUM_THREADS"], tree["trainer"]["threads"]))
            self.pid, self.returncode = 12345, 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(pool.subprocess, "Popen", FakeWorker)
    monkeypatch.setattr(pool, "POLL_S", 0)
    cores(4)
    pool._spawn_workers(config("sweep.workers=2"), Path("."), "parent", None, None)  # type: ignore[arg-type]
    assert seen == [("1", 1), ("1", 1)]  # (4 - 1) // 2, not cpu_count() // 2


# --- real processes -------------------------------------------------------------------------------------------


def _env_without_thread_settings() -> dict[str, str]:
    from tests.helpers import stage_env

    env = stage_env()
    env.pop("OMP_NUM_THREADS", None)  # stage_env pins 1: here the policy decides
    return env


def _expected(processes: int) -> int:
    return max(1, (len(os.sched_getaffinity(0)) - 1) // processes)


def _thread_lines(stderr: str) -> list[int]:
    return [int(n) for n in re.findall(r"torch threads: (\d+) of \d+ cores", stderr)]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import prepared_copy

    return prepared_copy(tmp_path_factory.mktemp("threads"))


def _run(project: Path, *args: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=project,
        env=_env_without_thread_settings(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_each_cpu_ddp_rank_gets_its_share(project: Path) -> None:
    proc = _run(
        project,
        "pipelines/train.py",
        "augment=none",
        "train.hparams=params",
        "train.epochs=1",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "paths.models=models-threads-ddp",
        f"tracking.uri=sqlite:///{project / 'mlflow-threads.db'}",
    )
    assert _thread_lines(proc.stderr) == [_expected(2)] * 2  # one line per rank


@pytest.mark.slow
def test_each_sweep_worker_gets_its_share(project: Path) -> None:
    proc = _run(
        project,
        "pipelines/sweep.py",
        "augment=none",
        "sweep.workers=2",
        "sweep.n_trials=4",
        "sweep.n_startup_trials=2",
        "sweep.space.epochs.low=1",
        "sweep.space.epochs.high=1",
        "sweep.study_name=threads",
        "paths.optuna=.optuna-threads",
        "paths.sweep=sweep-threads",
        f"tracking.uri=sqlite:///{project / 'mlflow-threads-sweep.db'}",
    )
    assert _thread_lines(proc.stderr) == [_expected(2)] * 2  # one line per worker process (each ran a trial)
