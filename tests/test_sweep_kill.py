"""Killed sweep workers (issue #11, items 4 and 10): dead workers' trials are failed, re-queued and re-run, their
MLflow runs closed, the study finishes; a resumed study does not re-measure a point. Real Optuna storage
(journal file, PostgreSQL), a real MLflow SQLite store, real processes killed with real signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.helpers import ROOT, isolated, needs_postgres, prepared_copy, signal_when, stage_env

# Tiny, fast trials: the prepared train split as is, 2 epochs each, one thread, no pruning.
FAST = [
    "augment=none",
    "sweep.space.epochs.low=2",
    "sweep.space.epochs.high=2",
    "sweep.pruner=none",
    "sweep.n_startup_trials=2",
    "trainer.threads=1",
]


def config(tmp: Path, *overrides: str):
    from cnnpipe.config import load_config

    return load_config(
        ["augment=none", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "sweep.study_name=kill", *overrides],
        root=ROOT,
    )


def trial_run(client: MlflowClient, number: int) -> str:
    """A RUNNING MLflow run standing for trial `number`'s child run."""
    from cnnpipe.tracking.runs import get_or_create_experiment

    exp = get_or_create_experiment(client, "kill", (Path(client.tracking_uri[len("sqlite:///") :]).parent).as_uri())
    return client.create_run(exp, run_name=f"trial-{number}", tags={"cnnpipe.trial_number": str(number)}).info.run_id


def dead_child(reap: bool) -> tuple[subprocess.Popen, int]:
    """A real child process killed with SIGKILL: reaped, or left a zombie (as an unreaped sweep worker is)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    from cnnpipe.processes import owner_token

    pid = child.pid
    token = owner_token(pid)
    os.kill(pid, signal.SIGKILL)
    if reap:
        child.wait()
    else:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
    return child, token


# --- fast tests: real storage, real processes, no stage run -------------------------------------------------


def test_recover_dead_trials_fails_a_zombie_workers_trial_requeues_it_and_closes_its_run(tmp_path: Path) -> None:
    """An unreaped killed worker (a zombie) is dead; so is the pid of an old `host:pid` owner that is gone;
    this live process is not. The dead ones' trials are failed and re-queued, their MLflow runs KILLED."""
    from cnnpipe.processes import owner_token
    from cnnpipe.tuning.space import suggest
    from cnnpipe.tuning.storage import RUN_ID_ATTR, WORKER_ATTR, TrialRecovery, recover_dead_trials
    from cnnpipe.tuning.study import load_study

    cfg = config(tmp_path)
    study = load_study(cfg, tmp_path, create=True)
    client = MlflowClient(cfg.tracking.uri)
    zombie, zombie_token = dead_child(reap=False)
    _, gone_token = dead_child(reap=True)
    owners = [zombie_token, gone_token.rsplit(":", 1)[0], owner_token()]  # new form, old form, alive
    runs = []
    for number, owner in enumerate(owners):
        trial = study.ask()
        suggest(trial, cfg.sweep.space)
        trial.set_user_attr(WORKER_ATTR, owner)
        runs.append(trial_run(client, number))
        trial.set_user_attr(RUN_ID_ATTR, runs[-1])
    try:
        assert recover_dead_trials(study, TrialRecovery(cfg.tracking.uri, tmp_path)) == 2
    finally:
        zombie.wait()
    trials = study.trials
    assert [t.state for t in trials[:3]] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [0, 1]
    for r in retries:
        assert r.params == trials[r.system_attrs["failed_trial"]].params
        assert WORKER_ATTR not in r.user_attrs and RUN_ID_ATTR not in r.user_attrs
    for number, owner in enumerate(owners[:2]):
        run = client.get_run(runs[number])
        assert run.info.status == "KILLED"
        reason = run.data.tags["cnnpipe.end_reason"]
        assert f"trial {number}" in reason and owner in reason
    assert client.get_run(runs[2]).info.status == "RUNNING"  # a live worker's run is left alone


@needs_postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # study.ask
def test_postgresql_heartbeat_recovery_requeues_and_closes_the_run(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker on another host (its liveness cannot be checked from here) stops its heartbeat: after
    `$CNNPIPE_HEARTBEAT_GRACE_S` the trial is failed by Optuna's heartbeat, re-queued, and its run closed."""
    from cnnpipe.tuning.space import suggest
    from cnnpipe.tuning.storage import RUN_ID_ATTR, WORKER_ATTR, recover_dead_trials
    from cnnpipe.tuning.study import load_study

    monkeypatch.setenv("CNNPIPE_HEARTBEAT_GRACE_S", "2")
    cfg = config(tmp_path, f"sweep.storage={pg_url}")
    study = load_study(cfg, tmp_path, create=True)
    client = MlflowClient(cfg.tracking.uri)
    trial = study.ask()
    suggest(trial, cfg.sweep.space)
    trial.set_user_attr(WORKER_ATTR, "some-other-host:4242:99")
    run_id = trial_run(client, trial.number)
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    study._storage.record_heartbeat(trial._trial_id)  # its last heartbeat
    assert recover_dead_trials(study) == 0  # still within the grace period
    time.sleep(3)
    assert recover_dead_trials(study) == 1
    first, retry = study.trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.params == first.params
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "trial 0" in run.data.tags["cnnpipe.end_reason"] and "heartbeat" in run.data.tags["cnnpipe.end_reason"]
    optuna.delete_study(study_name="kill", storage=pg_url)


def _quick(trial: optuna.Trial, cfg) -> float:
    from cnnpipe.tuning.space import suggest

    values = suggest(trial, cfg.sweep.space)
    return float(values["optim.lr"]) * values["data.batch_size"]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_does_not_repeat_a_measured_point(tmp_path: Path, sampler: str) -> None:
    """Each `load_study` is a new process's sampler: before the fix it replayed the seeded stream from the
    start, so the resumed trials re-proposed the first trials' params exactly."""
    from cnnpipe.tuning.study import load_study

    cfg = config(tmp_path, f"sweep.sampler={sampler}", "sweep.n_startup_trials=10")
    for _ in range(3):  # three invocations of the stage, two trials each
        study = load_study(cfg, tmp_path, create=True)
        study.optimize(lambda t: _quick(t, cfg), n_trials=2)
    points = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(points) == 6 and len(set(points)) == 6, points


def test_a_small_space_is_covered_without_repeats_and_a_retry_keeps_its_params(tmp_path: Path) -> None:
    """A 2 x 2 categorical space: four trials measure four different points, even across resumes. A trial
    re-queued after its worker died keeps its params (never measured), even when they match a running one."""
    from cnnpipe.tuning.storage import requeue
    from cnnpipe.tuning.study import load_study

    cfg = config(
        tmp_path,
        "sweep.sampler=random",
        "sweep.space.lr.type=categorical",
        "sweep.space.lr.choices=[0.001,0.01]",
        "sweep.space.batch_size.choices=[32,64]",
        "sweep.space.epochs.low=2",
        "sweep.space.epochs.high=2",
    )
    for n in (1, 1, 2):
        study = load_study(cfg, tmp_path, create=True)
        study.optimize(lambda t: _quick(t, cfg), n_trials=n)
    points = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(points) == 4
    dead = study.ask()
    _quick(dead, cfg)
    study.tell(dead, state=TrialState.FAIL)  # its worker died: failed and queued again
    requeue(study, study.trials[-1])
    study = load_study(cfg, tmp_path)
    study.optimize(lambda t: _quick(t, cfg), n_trials=1)
    assert study.trials[-1].params == study.trials[-2].params
    assert study.trials[-1].state == TrialState.COMPLETE


def test_close_orphaned_trial_runs_closes_only_runs_of_finished_trials(tmp_path: Path) -> None:
    """The stage's pass over the parent's RUNNING child runs: a run whose trial finished is an orphan (its
    worker died before ending it, e.g. before recording the run id in the trial); a running trial's is not."""
    from cnnpipe.tuning.pool import close_orphaned_trial_runs
    from cnnpipe.tuning.study import load_study

    cfg = config(tmp_path)
    study = load_study(cfg, tmp_path, create=True)
    study.optimize(lambda t: _quick(t, cfg), n_trials=1)
    running = study.ask()
    _quick(running, cfg)
    client = MlflowClient(cfg.tracking.uri)
    parent = trial_run(client, 99)
    children = [trial_run(client, n) for n in (0, 1)]
    for run_id in children:
        client.set_tag(run_id, "mlflow.parentRunId", parent)
    assert close_orphaned_trial_runs(study, cfg.tracking.uri, parent) == 1
    orphan = client.get_run(children[0])
    assert orphan.info.status == "KILLED" and "trial 0 is COMPLETE" in orphan.data.tags["cnnpipe.end_reason"]
    assert client.get_run(children[1]).info.status == "RUNNING"
    assert close_orphaned_trial_runs(study, cfg.tracking.uri, parent) == 0


# --- slow tests: the sweep stage, its workers killed ---------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_copy(tmp_path_factory.mktemp("sweep-kill"))


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc: other people's sweeps may run on this machine too)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes()).decode().split("\0")
    except OSError:
        return []


def running_trial_of(study_loader, pid: int) -> optuna.trial.FrozenTrial | None:
    host = socket.gethostname()
    for t in study_loader().get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get("cnnpipe.worker", ""))  # host:pid:start (host:pid before the fix)
        if owner.split(":")[:2] == [host, str(pid)] and t.user_attrs.get("cnnpipe.mlflow_run_id"):
            return t
    return None


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its workers
    proc.wait()
    pytest.fail(f"timed out waiting for {what}")


def assert_finished_with_retry(
    study: optuna.Study, n_trials: int, killed: int, client: MlflowClient, dead_pid: int
) -> str:
    """The study has `n_trials` complete trials, the killed one failed and re-run with its params, no run is
    left RUNNING and the killed trial's run is KILLED, tagged with a reason naming its dead worker (returned)."""
    trials = study.trials
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == n_trials
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[killed].params
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe-digits").experiment_id])
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    killed_run = client.get_run(trials[killed].user_attrs["cnnpipe.mlflow_run_id"])
    assert killed_run.info.status == "KILLED"
    reason = killed_run.data.tags["cnnpipe.end_reason"]
    assert f"{socket.gethostname()}:{dead_pid}:" in reason
    parent = [r for r in runs if r.data.tags.get("cnnpipe.stage") == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    return reason


@pytest.mark.slow
def test_a_killed_local_worker_is_reaped_its_trial_rerun_and_the_study_finished(project: Path) -> None:
    name = "kill3"
    journal = project / f".optuna-{name}" / "journal.log"

    def study() -> optuna.Study:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        return optuna.load_study(study_name=name, storage=storage)

    proc = subprocess.Popen(
        [sys.executable, "pipelines/sweep.py", *FAST, *isolated(project, name), "sweep.workers=3", "sweep.n_trials=4"],
        cwd=project,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a failing test kills the stage and its workers together
    )

    def worker_1() -> int | None:
        pids = [p for p in children_of(proc.pid) if "--index 1 " in " ".join(cmdline(p))]
        return pids[0] if pids else None

    pid = wait_for(worker_1, 60, "worker 1 to start", proc)
    wait_for(lambda: journal.exists() and running_trial_of(study, pid), 120, "worker 1's trial", proc)
    # The check again with the worker stopped, then the kill: the trial seen is the one killed.
    trial = signal_when(pid, lambda: running_trial_of(study, pid), signal.SIGKILL, what="worker 1's trial")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "warning: worker" in line]
    assert len(warnings) == 1, err[-3000:]
    assert warnings[0].startswith(
        f"[sweep] warning: worker 1 died by signal SIGKILL and its trial {trial.number} was re-run (as trial "
    )
    client = MlflowClient(f"sqlite:///{project / f'mlflow-{name}.db'}")
    # The trial's recovery closes the run (or, if a surviving worker's next run got there first, the orphan
    # check every new MLflow run makes, in tracking.runs): either way the reason names the dead worker.
    assert_finished_with_retry(study(), 4, trial.number, client, pid)


@pytest.mark.slow
@needs_postgres
def test_a_killed_postgresql_sweep_resumes_closes_the_orphaned_run_and_ends_its_parent(
    project: Path, pg_url: str
) -> None:
    name = "killpg"
    overrides = [*FAST, *isolated(project, name), f"sweep.storage={pg_url}", "sweep.n_trials=3"]
    overrides += ["sweep.space.epochs.low=6", "sweep.space.epochs.high=6"]  # the kill lands inside a trial
    proc = subprocess.Popen(
        [sys.executable, "pipelines/sweep.py", *overrides],
        cwd=project,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a failing test kills the stage and its workers together
    )

    # One storage (one connection pool) for the polling: a storage per poll left a pool of open connections
    # behind each time, and on a slow day the test used up PostgreSQL's 100 connections.
    storage = optuna.storages.RDBStorage(pg_url)

    def second_trial() -> optuna.trial.FrozenTrial | None:
        try:
            trials = optuna.load_study(study_name=name, storage=storage).trials
        except KeyError:
            return None
        done = any(t.state == TrialState.COMPLETE for t in trials)
        running = running_trial_of(lambda: optuna.load_study(study_name=name, storage=storage), proc.pid)
        return running if done else None

    try:
        wait_for(second_trial, 120, "a second trial to run", proc)
        parent_before = optuna.load_study(study_name=name, storage=storage).user_attrs["cnnpipe.mlflow_parent_run_id"]
        # the stage is the only worker: killed outright, while the trial seen still runs
        trial = signal_when(proc.pid, second_trial, signal.SIGKILL, what="a second trial to run")
    finally:
        storage.engine.dispose()
        proc.kill()
        proc.wait()

    again = subprocess.run(
        [sys.executable, "pipelines/sweep.py", *overrides],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "re-queued 1 trial(s)" in again.stderr
    study = optuna.load_study(study_name=name, storage=pg_url)
    client = MlflowClient(f"sqlite:///{project / f'mlflow-{name}.db'}")
    reason = assert_finished_with_retry(study, 3, trial.number, client, proc.pid)
    assert f"optuna trial {trial.number} failed and was re-queued" in reason  # closed by the trial's recovery
    assert study.user_attrs["cnnpipe.mlflow_parent_run_id"] == parent_before  # reopened, and now FINISHED
