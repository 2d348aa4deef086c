"""Sweeps against real Optuna storage (journal file, PostgreSQL) and a real MLflow store."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cnnpipe.tuning.storage import RUN_ID_ATTR, WORKER_ATTR
from tests.helpers import isolated, needs_postgres, prepared_copy, signal_when, stage_env

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
# Tiny, fast trials: no augmented copies, 1-2 epochs.
FAST = ["augment=none", "sweep.space.epochs.low=1", "sweep.space.epochs.high=2", "sweep.n_startup_trials=2"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy with prepared + augmented digits, shared by the sweep tests."""
    return prepared_copy(tmp_path_factory.mktemp("sweep-project"))


def sweep_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "pipelines/sweep.py", *FAST, *overrides]


def run_sweep(project: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        sweep_cmd(*overrides), cwd=project, env=stage_env(), capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def journal_study(project: Path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(project / f".optuna-{name}" / "journal.log"))
    )
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_sweep_writes_outputs_and_nested_mlflow_runs(project: Path) -> None:
    proc = run_sweep(project, *isolated(project, "basic"), "sweep.n_trials=3")
    assert "trial 3 of 3" in proc.stderr and "best val/f1_macro" in proc.stderr
    out = project / "sweep-basic"
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(best["params"]) == {"optim.lr", "data.batch_size", "train.epochs"}
    assert best["trials"]["total"] == 3
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,value,epochs,duration_s") and len(rows) == 4
    for picture in ("history.png", "importances.png", "parallel.png"):
        assert (out / picture).stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{project / 'mlflow-basic.db'}")
    exp = client.get_experiment_by_name("cnnpipe-digits")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cnnpipe.stage") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cnnpipe.stage") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.run_id == best["mlflow_parent_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.metrics[f"best/{best['metric']}"] == pytest.approx(best["best_value"])
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["cnnpipe.trial_state"] in ("complete", "pruned")
        assert child.info.status == "FINISHED"
        epochs = int(child.data.params["train.epochs"])
        history = client.get_metric_history(child.info.run_id, "val/acc")
        assert 1 <= len(history) <= epochs
    numbers = sorted(int(c.data.tags["cnnpipe.trial_number"]) for c in children)
    assert numbers == [0, 1, 2]


@pytest.mark.slow
def test_resume_continues_to_n_trials_in_total_with_the_same_parent(project: Path) -> None:
    names = isolated(project, "resume")
    run_sweep(project, *names, "sweep.n_trials=2")
    first = yaml.safe_load((project / "sweep-resume" / "best_params.yaml").read_text())
    run_sweep(project, *names, "sweep.n_trials=3")
    second = yaml.safe_load((project / "sweep-resume" / "best_params.yaml").read_text())
    assert second["trials"]["total"] == 3  # not 2 + 3
    assert second["mlflow_parent_run_id"] == first["mlflow_parent_run_id"]
    run_sweep(project, *names, "sweep.n_trials=3")  # already complete: runs nothing more
    assert len(journal_study(project, "resume").trials) == 3


@pytest.mark.slow
def test_killed_sweep_resumes_with_no_lost_or_duplicated_trials(project: Path) -> None:
    name = "killed"
    names = isolated(project, name)
    proc = subprocess.Popen(
        sweep_cmd(
            *names, "sweep.n_trials=4", "sweep.space.epochs.low=3", "sweep.space.epochs.high=3", "sweep.pruner=none"
        ),
        cwd=project,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = project / f".optuna-{name}" / "journal.log"

    def second_running() -> bool:  # one trial done and the next one running, claimed by its worker (a trial
        if not journal.exists():  # killed before its claim is recovered only after UNCLAIMED_GRACE_S)
            return False
        trials = journal_study(project, name).trials
        if not any(t.state == TrialState.COMPLETE for t in trials):
            return False
        return trials[-1].state == TrialState.RUNNING and WORKER_ATTR in trials[-1].user_attrs

    try:
        signal_when(proc.pid, second_running, signal.SIGKILL, what="a running second trial")
    finally:
        proc.kill()
        proc.wait()
    assert any(t.state == TrialState.RUNNING for t in journal_study(project, name).trials)

    proc2 = run_sweep(
        project,
        *names,
        "sweep.n_trials=4",
        "sweep.space.epochs.low=3",
        "sweep.space.epochs.high=3",
        "sweep.pruner=none",
    )
    assert "re-queued 1 trial(s)" in proc2.stderr
    trials = journal_study(project, name).trials
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 4 and len(failed) == 1  # the killed trial, retried once with the same params
    retry = [t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params
    assert len({t.number for t in trials}) == len(trials)
    best = yaml.safe_load((project / f"sweep-{name}" / "best_params.yaml").read_text())
    assert best["trials"]["complete"] == 4


@pytest.mark.slow
def test_pruning_prunes_a_hopeless_learning_rate(project: Path) -> None:
    name = "prune"
    run_sweep(
        project,
        *isolated(project, name),
        "sweep.n_trials=6",
        "sweep.sampler=random",
        "sweep.pruner=median",
        "sweep.n_startup_trials=1",
        "sweep.n_warmup_epochs=0",
        "sweep.space.epochs.low=4",
        "sweep.space.epochs.high=4",
        "optim.scheduler=none",
        "sweep.space.lr.type=categorical",
        "sweep.space.lr.choices=[0.0000001,0.003]",
    )
    trials = journal_study(project, name).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.params, t.state) for t in trials]
    assert all(len(t.intermediate_values) < 4 for t in pruned)
    # The six trials measure the six distinct points (no repeats), so a good lr with a bigger batch, slower in
    # its first epoch than the one complete trial, may be pruned too; the hopeless lr always is, once a good
    # trial has completed.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    good = [t.number for t in trials if t.params["optim.lr"] == pytest.approx(0.003) and t.state == TrialState.COMPLETE]
    hopeless = [t for t in trials if t.params["optim.lr"] == pytest.approx(1e-7) and t.number > min(good)]
    assert hopeless and all(t.state == TrialState.PRUNED for t in hopeless), [(t.params, t.state) for t in trials]
    # A pruned trial is a result, not a failure: its MLflow run ends FINISHED (the UI shows no red "Failed").
    client = MlflowClient(f"sqlite:///{project / f'mlflow-{name}.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe-digits").experiment_id])
    pruned_runs = [r for r in runs if r.data.tags.get("cnnpipe.trial_state") == "pruned"]
    assert len(pruned_runs) == len(pruned) and all(r.info.status == "FINISHED" for r in pruned_runs)


@pytest.mark.slow
def test_diverging_trial_fails_and_the_study_goes_on(project: Path) -> None:
    name = "nan"
    run_sweep(
        project,
        *isolated(project, name),
        "sweep.n_trials=3",
        "sweep.sampler=random",
        "optim=sgd",
        "optim.scheduler=none",
        "sweep.space.lr.type=categorical",
        "sweep.space.lr.choices=[1e12,0.01]",
        "sweep.space.epochs.low=1",
        "sweep.space.epochs.high=1",
    )
    trials = journal_study(project, name).trials
    assert len(trials) == 3
    states = {t.params["optim.lr"]: t.state for t in trials}
    assert states.get(1e12) == TrialState.FAIL and states.get(0.01) == TrialState.COMPLETE


@pytest.mark.slow
@needs_postgres
def test_two_workers_share_a_postgresql_study(project: Path) -> None:
    name = f"pg-{uuid.uuid4().hex[:8]}"
    run_sweep(
        project,
        *isolated(project, name),
        f"sweep.storage={PG_URL}",
        "sweep.workers=2",
        "sweep.n_trials=4",
        "sweep.pruner=none",
    )
    study = optuna.load_study(study_name=name, storage=PG_URL)
    # Two workers may check the budget at the same moment and both start a trial; the one past n_trials is
    # marked surplus and pruned before it trains (tuning.storage.is_surplus), so exactly 4 count and complete.
    surplus = [t for t in study.trials if t.user_attrs.get("cnnpipe.surplus")]
    assert all(t.state == TrialState.PRUNED and not t.intermediate_values for t in surplus)
    trials = [t for t in study.trials if t not in surplus]
    assert len(trials) == 4 and len(surplus) <= 1
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs["cnnpipe.worker"] for t in trials}
    assert len(workers) == 2  # both processes ran trials
    client = MlflowClient(f"sqlite:///{project / f'mlflow-{name}.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe-digits").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cnnpipe.stage") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    optuna.delete_study(study_name=name, storage=PG_URL)


def test_workers_get_their_own_gpu_and_a_share_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnpipe.tuning.pool import worker_env

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [worker_env(i, 4, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0", "1", "0"]
    assert worker_env(0, 4, 2)["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [worker_env(i, 1, 2)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert worker_env(0, 1, 0)["CUDA_VISIBLE_DEVICES"] == ""  # no GPUs: left as it was


def test_a_trial_started_past_the_budget_is_surplus_and_does_not_count() -> None:
    from cnnpipe.tuning.storage import budget_used, is_surplus

    study = optuna.create_study()
    for _ in range(4):
        study.ask()  # RUNNING trials count toward the budget
    late = study.ask()  # another worker checked the budget before the fourth trial existed
    assert not is_surplus(study, 3, 4) and is_surplus(study, late.number, 4)
    late.set_user_attr("cnnpipe.surplus", True)  # what the objective does before it prunes such a trial
    study.tell(late, state=TrialState.PRUNED)
    assert budget_used(study.get_trials()) == 4


def test_an_interrupted_last_trial_still_runs_when_the_study_resumes() -> None:
    """The re-queued retry of the last trial fills the budget before it runs: the study is not done yet."""
    from cnnpipe.tuning.storage import requeue, study_is_done

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    interrupted = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(interrupted, state=TrialState.FAIL)
    requeue(study, study.trials[-1])
    assert [t.state for t in study.trials][-2:] == [TrialState.FAIL, TrialState.WAITING]
    assert not study_is_done(study, 3)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert study.trials[-1].params == study.trials[-2].params and study.trials[-1].state == TrialState.COMPLETE
    assert study_is_done(study, 3) and not study_is_done(study, 4)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_resumed_study_loses_nothing(project: Path) -> None:
    name = "ctrlc"
    args = (
        *isolated(project, name),
        "sweep.n_trials=3",
        "sweep.space.epochs.low=3",
        "sweep.space.epochs.high=3",
        "sweep.pruner=none",
    )
    proc = subprocess.Popen(
        sweep_cmd(*args), cwd=project, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    journal = project / f".optuna-{name}" / "journal.log"

    def running() -> bool:  # a trial training inside its MLflow run: claimed, its run id recorded
        return journal.exists() and any(
            t.state == TrialState.RUNNING and RUN_ID_ATTR in t.user_attrs for t in journal_study(project, name).trials
        )

    try:
        signal_when(proc.pid, running, signal.SIGINT, what="a running trial")  # not between two short trials
    except BaseException:  # the sweep ended first, or never ran a trial: do not leave it running
        proc.kill()
        proc.wait()
        raise
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the sweep did not stop within 120 s of Ctrl-C; its stderr ends with:\n{err[-3000:]}")
    assert proc.returncode == 130, err[-2000:]
    trials = journal_study(project, name).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # the running trial is marked failed
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and any(t.state == TrialState.WAITING for t in trials)  # ...and queued again
    client = MlflowClient(f"sqlite:///{project / f'mlflow-{name}.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnnpipe-digits").experiment_id])
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"} and "KILLED" in {r.info.status for r in runs}

    run_sweep(project, *args)
    trials = journal_study(project, name).trials
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
