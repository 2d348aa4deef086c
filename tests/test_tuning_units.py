"""Unit tests of the sweep's storage and study (cnnpipe.tuning.storage, cnnpipe.tuning.study) against real Optuna
storage: a journal file and SQLite in tmp_path, a throwaway PostgreSQL database. No stage process, no training,
no MLflow store (its first use costs seconds): recovered trials here have no MLflow run id."""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial

from cnnpipe.config import Config, load_config
from cnnpipe.errors import ConfigError
from cnnpipe.processes import owner_token
from cnnpipe.tuning.storage import (
    GRACE_ENV,
    RUN_ID_ATTR,
    SURPLUS_ATTR,
    UNCLAIMED_GRACE_S,
    WORKER_ATTR,
    TrialRecovery,
    budget_used,
    describe_storage,
    heartbeat_timing,
    is_surplus,
    journal_path,
    open_storage,
    recover_dead_trials,
    requeue,
    study_is_done,
    worker_pid,
)
from cnnpipe.tuning.study import (
    NoRepeatSampler,
    build_pruner,
    build_sampler,
    load_study,
    sampler_seed,
    study_name,
)
from tests.helpers import ROOT, needs_postgres

X = FloatDistribution(0.0, 1.0)
HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def _quiet_optuna() -> Iterator[None]:
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(before)


def config(*overrides: str) -> Config:
    return load_config(["augment=none", *overrides], root=ROOT)


def dead_token() -> str:
    """A `host:pid:start` owner on this host that is surely not running: pid_max is never a pid."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    return f"{HOST}:{pid_max}:12345"


def running(study: optuna.Study, owner: str | None) -> optuna.Trial:
    """A RUNNING trial with a value for x, claimed by `owner` (None: not claimed yet)."""
    trial = study.ask({"x": X})
    if owner is not None:
        trial.set_user_attr(WORKER_ATTR, owner)
    return trial


# --- storage ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, (10, 30)),
        ("6", (2, 6)),
        ("2", (1, 2)),
        ("90", (10, 90)),
        ("0", (10, 30)),
        ("-5", (10, 30)),
        ("x", (10, 30)),
    ],
)
def test_heartbeat_timing_takes_a_positive_grace_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: tuple[int, int]
) -> None:
    if env is None:
        monkeypatch.delenv(GRACE_ENV, raising=False)
    else:
        monkeypatch.setenv(GRACE_ENV, env)
    assert heartbeat_timing() == expected


def test_worker_pid_is_the_pid_of_a_worker_on_this_host_only() -> None:
    def trial(owner: str | None) -> optuna.trial.FrozenTrial:
        attrs = {} if owner is None else {WORKER_ATTR: owner}
        return create_trial(state=TrialState.RUNNING, user_attrs=attrs)

    assert worker_pid(trial(f"{HOST}:1234:5678")) == 1234
    assert worker_pid(trial(f"{HOST}:77")) == 77  # the older `host:pid` form
    assert worker_pid(trial(f"not-{HOST}:1234:5678")) is None
    assert worker_pid(trial(f"{HOST}:abc:1")) is None
    assert worker_pid(trial(None)) is None


def test_the_default_storage_is_a_journal_file_under_paths_optuna(tmp_path: Path) -> None:
    cfg = config("paths.optuna=.optuna-unit", "sweep.study_name=j")
    expected = tmp_path.resolve() / ".optuna-unit" / "journal.log"
    assert journal_path(cfg, tmp_path) == expected
    assert describe_storage(cfg, tmp_path) == str(expected)
    assert not expected.parent.exists()
    storage = open_storage(cfg, tmp_path)
    assert isinstance(storage, JournalStorage) and expected.parent.is_dir()  # the folder is made
    optuna.create_study(study_name="j", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = JournalStorage(JournalFileBackend(str(expected)))  # what another process opens: the same file
    assert [t.state for t in optuna.load_study(study_name="j", storage=again).trials] == [TrialState.COMPLETE] * 2


def test_a_queued_dvc_experiment_keeps_its_journal_in_the_original_project(tmp_path: Path) -> None:
    """DVC runs queued experiments in `.dvc/tmp/exps/...` copies: their study is the project's."""
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    assert journal_path(config(), copy) == tmp_path.resolve() / ".optuna" / "journal.log"


def test_a_storage_url_opens_rdb_storage_with_the_heartbeat_and_recovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GRACE_ENV, "9")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = config(f"sweep.storage={url}", "tracking.uri=sqlite:///elsewhere.db")
    assert describe_storage(cfg, tmp_path) == url
    storage = open_storage(cfg, tmp_path)
    assert isinstance(storage, RDBStorage)
    assert (storage.heartbeat_interval, storage.grace_period) == (3, 9)
    recovery = storage.get_heartbeat_stale_trial_callback()
    assert isinstance(recovery, TrialRecovery)
    assert (recovery.tracking_uri, recovery.root) == ("sqlite:///elsewhere.db", tmp_path)
    assert (tmp_path / "optuna.db").is_file()
    assert not (tmp_path / ".optuna").exists()  # no journal beside it


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("not a url", "ArgumentError"),
        ("sqlite:////nonexistent-cnnpipe-dir/optuna.db", "OperationalError"),
        ("postgresql://postgres:s3cret@127.0.0.1:1/none", "OperationalError"),  # nothing listens on port 1
    ],
)
def test_a_bad_storage_url_is_one_line_naming_the_key(tmp_path: Path, url: str, error: str) -> None:
    cfg = config(f"sweep.storage={url}")  # the config accepts any string: the storage says what is wrong
    with pytest.raises(ConfigError) as raised:
        open_storage(cfg, tmp_path)
    message = str(raised.value)
    assert message.startswith("sweep.storage: cannot open ") and f"{error}:" in message
    assert "\n" not in message and "s3cret" not in message  # one line, the password masked
    assert not (tmp_path / ".optuna").exists()  # no fallback to the journal


def test_a_pinned_study_of_the_other_direction_is_refused(tmp_path: Path) -> None:
    load_study(config("sweep.study_name=dir", "sweep.direction=maximize"), tmp_path, create=True)
    with pytest.raises(ConfigError, match=r"sweep.direction is minimize, but study 'dir' .* created to maximize"):
        load_study(config("sweep.study_name=dir", "sweep.direction=minimize"), tmp_path, create=True)


def test_requeue_queues_the_same_params_as_a_retry_without_worker_and_run(tmp_path: Path) -> None:
    study = optuna.create_study(storage=open_storage(config(), tmp_path), study_name="rq")
    trial = running(study, f"{HOST}:1:2")
    trial.set_user_attr(RUN_ID_ATTR, "abc")
    trial.set_user_attr("cnnpipe.note", "kept")
    study.tell(trial, state=TrialState.FAIL)
    requeue(study, study.trials[0])
    failed, retry = study.trials
    assert retry.state == TrialState.WAITING and retry.params == failed.params
    assert retry.system_attrs["failed_trial"] == 0 and retry.system_attrs["retry_history"] == [0]
    assert retry.user_attrs == {"cnnpipe.note": "kept"}  # only the worker and its run are dropped
    assert failed.user_attrs[WORKER_ATTR] == f"{HOST}:1:2"  # the failed trial keeps its record


def test_a_trial_is_retried_at_most_three_times_and_the_budget_counts_the_last_attempt_only() -> None:
    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25})
    for _ in range(4):
        trial = study.ask({"x": X})
        assert trial.params == {"x": 0.25}
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, study.trials[-1])
    trials = study.trials
    assert len(trials) == 4 and [t.state for t in trials] == [TrialState.FAIL] * 4  # no fifth attempt queued
    assert trials[-1].system_attrs["retry_history"] == [0, 1, 2]
    assert budget_used(trials) == 1  # the three retried failures do not count
    assert study_is_done(study, 1) and not study_is_done(study, 2)


def test_budget_used_counts_every_state_except_retried_failures_and_surplus() -> None:
    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, params={"x": 0.1}, distributions={"x": X}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={"x": 0.2}, distributions={"x": X}))
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.3}, distributions={"x": X}))  # not retried
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={SURPLUS_ATTR: True}))
    running(study, None)
    assert budget_used(study.trials) == 4
    assert study_is_done(study, 4) and not study_is_done(study, 5)
    study.enqueue_trial({"x": 0.5})
    assert budget_used(study.trials) == 5
    assert not study_is_done(study, 5) and not study_is_done(study, 2)  # a waiting trial must still run


def test_a_retry_does_not_make_the_trials_after_it_surplus() -> None:
    """The failed original and its retry are one trial of the budget."""
    study = optuna.create_study()
    first = study.ask({"x": X})
    study.tell(first, state=TrialState.FAIL)
    requeue(study, study.trials[0])
    retry = study.ask({"x": X})  # the waiting retry is taken first
    assert retry.number == 1 and retry.params == first.params
    second, third = study.ask({"x": X}), study.ask({"x": X})
    assert (second.number, third.number) == (2, 3)
    assert [is_surplus(study, n, 2) for n in (1, 2, 3)] == [False, False, True]


def test_recover_dead_trials_requeues_only_dead_local_workers_trials(tmp_path: Path) -> None:
    """Journal storage: dead pid, or this pid with another start time (a reused pid), is dead; this process,
    a worker on another host and a trial not yet claimed are left RUNNING."""
    study = optuna.create_study(storage=open_storage(config(), tmp_path), study_name="rec")
    pid = os.getpid()
    owners = [dead_token(), f"{HOST}:{pid}:1", owner_token(), "other-host:1:2", None]
    for owner in owners:
        running(study, owner)
    assert recover_dead_trials(study) == 2
    states = [t.state for t in study.trials]
    assert states[:5] == [TrialState.FAIL, TrialState.FAIL] + [TrialState.RUNNING] * 3
    retries = study.trials[5:]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [0, 1]
    assert all(t.state == TrialState.WAITING and WORKER_ATTR not in t.user_attrs for t in retries)
    assert recover_dead_trials(study) == 0  # nothing left to recover: no second retry
    assert len(study.trials) == 7
    # The unclaimed one lost its worker in the moment between Optuna's creating it and the claim: a minute on,
    # nothing alive would still leave it unclaimed on a journal (one host).
    later = datetime.datetime.now() + datetime.timedelta(seconds=UNCLAIMED_GRACE_S + 1)
    assert recover_dead_trials(study, now=later) == 1
    assert [t.state for t in study.trials[:5]] == [TrialState.FAIL] * 2 + [TrialState.RUNNING] * 2 + [TrialState.FAIL]
    assert study.trials[-1].system_attrs["failed_trial"] == 4 and study.trials[-1].state == TrialState.WAITING


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # study.ask
def test_sqlite_storage_recovers_a_dead_local_worker_and_a_stale_heartbeat_once_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RDB storage: Optuna's heartbeat fails a trial whose worker (on another host) went quiet for the grace
    period; the storage's own TrialRecovery re-queues it. The heartbeat is aged in the database, not waited for."""
    monkeypatch.setenv(GRACE_ENV, "30")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = config(f"sweep.storage={url}", "sweep.study_name=hb")
    study = load_study(cfg, tmp_path, create=True)
    remote = running(study, "other-host:1:2")
    local = running(study, dead_token())
    study._storage.record_heartbeat(remote._trial_id)
    assert recover_dead_trials(study) == 1  # the local dead one; the remote heartbeat is fresh
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("update trial_heartbeats set heartbeat = datetime(heartbeat, '-60 seconds')"))
    engine.dispose()
    assert recover_dead_trials(study) == 1
    assert recover_dead_trials(study) == 0
    by_number = {t.number: t for t in study.trials}
    assert by_number[remote.number].state == TrialState.FAIL and by_number[local.number].state == TrialState.FAIL
    retries = {t.system_attrs["failed_trial"]: t for t in study.trials if t.state == TrialState.WAITING}
    assert set(retries) == {remote.number, local.number}
    assert retries[remote.number].params == by_number[remote.number].params


def test_a_recovered_trial_without_a_run_id_closes_no_run(tmp_path: Path) -> None:
    study = optuna.create_study()
    trial = running(study, dead_token())
    study.tell(trial, state=TrialState.FAIL)
    recovery = TrialRecovery("sqlite:///never-opened.db", tmp_path)
    assert recovery.close_run(study.trials[0], "why") is False
    recovery.after_failure(study, study.trials[0], "gone")
    assert study.trials[1].state == TrialState.WAITING and study.trials[1].params == study.trials[0].params
    assert not (tmp_path / "never-opened.db").exists() and not Path("never-opened.db").exists()


# --- study --------------------------------------------------------------------------------------------------


def test_study_name_is_pinned_or_named_after_the_dataset_and_a_hash() -> None:
    assert re.fullmatch(r"cnnpipe-digits-[0-9a-f]{8}", study_name(config())), study_name(config())
    assert study_name(config("sweep.study_name=mine")) == "mine"


@pytest.mark.parametrize(
    "override",
    [
        "sweep.n_trials=99",
        "sweep.timeout=60",
        "sweep.workers=3",
        "sweep.storage=sqlite:///x.db",
        "tracking.uri=sqlite:///other.db",
        "paths.models=models-other",
        "train.resume=never",
        "data.batch_size=128",  # tuned: every trial sets it
        "train.epochs=3",  # tuned
    ],
)
def test_study_name_ignores_what_does_not_change_a_trial(override: str) -> None:
    assert study_name(config(override)) == study_name(config())


@pytest.mark.parametrize(
    "override", ["seed=7", "sweep.sampler=random", "sweep.direction=minimize", "sweep.space.epochs.high=30"]
)
def test_study_name_changes_with_what_a_trial_computes(override: str) -> None:
    assert study_name(config(override)) != study_name(config())


def test_sampler_seed_is_seed_plus_worker_for_a_new_study_and_fresh_for_a_resumed_one() -> None:
    assert [sampler_seed(42, 0, w) for w in range(3)] == [42, 43, 44]
    resumed = {(n, w): sampler_seed(42, n, w) for n in (1, 2, 5) for w in (0, 1)}
    assert len(set(resumed.values())) == 6 and 42 not in resumed.values() and 43 not in resumed.values()
    assert all(0 <= s < 2**32 for s in resumed.values())
    assert sampler_seed(42, 5, 1) == resumed[(5, 1)]  # deterministic: the same in every process
    assert sampler_seed(7, 5, 1) != resumed[(5, 1)]


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        (["sweep.sampler=tpe"], optuna.samplers.TPESampler),
        (["sweep.sampler=random"], optuna.samplers.RandomSampler),
        (["sweep.sampler=cmaes"], optuna.samplers.CmaEsSampler),
        (["sweep.sampler=gp"], optuna.samplers.GPSampler),
    ],
)
def test_build_sampler_wraps_the_configured_sampler(overrides: list[str], kind: type) -> None:
    sampler = build_sampler(config(*overrides))
    assert isinstance(sampler, NoRepeatSampler) and type(sampler.base) is kind
    assert set(sampler.space) == {"optim.lr", "data.batch_size", "train.epochs"}  # the whole space at once


def test_tpe_is_multivariate_and_lies_constantly_only_with_several_workers() -> None:
    one = build_sampler(config("sweep.sampler=tpe", "sweep.n_startup_trials=5")).base
    many = build_sampler(config("sweep.sampler=tpe", "sweep.workers=2")).base
    assert one._multivariate and many._multivariate
    assert (one._constant_liar, many._constant_liar) == (False, True)
    assert one._n_startup_trials == 5


def test_the_sampler_is_seeded_from_the_worker_and_the_trials_so_far() -> None:
    def first_draw(sampler: optuna.samplers.BaseSampler) -> float:
        study = optuna.create_study(sampler=sampler)
        return study.ask().suggest_float("x", 0, 1)

    cfg = config("sweep.sampler=random", "seed=5")
    for worker, so_far in ((0, 0), (1, 0), (0, 3)):
        built = build_sampler(cfg, worker_index=worker, trials_so_far=so_far).base
        expected = optuna.samplers.RandomSampler(seed=sampler_seed(5, so_far, worker))
        assert first_draw(built) == first_draw(expected), (worker, so_far)


def no_repeat_study(space: dict, seed: int = 0) -> optuna.Study:
    return optuna.create_study(sampler=NoRepeatSampler(optuna.samplers.RandomSampler(seed=seed), space, seed=seed))


def ask(study: optuna.Study, space: dict) -> dict:
    return study.ask(dict(space)).params


@pytest.mark.parametrize("seed", range(4))
def test_no_repeat_proposes_only_points_not_measured_and_failed_points_are_not_measured(seed: int) -> None:
    space = {"x": CategoricalDistribution([1, 2, 3, 4, 5])}
    study = no_repeat_study(space, seed)
    for x, state in ((1, TrialState.COMPLETE), (2, TrialState.PRUNED), (4, TrialState.FAIL)):
        value = 1.0 if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, value=value, params={"x": x}, distributions=space))
    study.ask(dict(space))  # RUNNING: being measured
    taken = study.trials[-1].params["x"]
    assert taken in (3, 4, 5)
    rest = {3, 4, 5} - {taken}
    assert {ask(study, space)["x"], ask(study, space)["x"]} == rest


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler
def test_when_every_draw_repeats_the_one_unmeasured_point_of_a_stepped_grid_is_taken() -> None:
    """The base sampler always proposes (1, 0.0), measured: the wrapper falls back to the grid's free point."""
    space = {"n": IntDistribution(1, 3), "f": FloatDistribution(0.0, 1.0, step=0.5)}
    stuck = optuna.samplers.PartialFixedSampler({"n": 1, "f": 0.0}, optuna.samplers.RandomSampler(seed=1))
    study = optuna.create_study(sampler=NoRepeatSampler(stuck, space, seed=1))
    for n in (1, 2, 3):
        for f in (0.0, 0.5, 1.0):
            if (n, f) != (2, 1.0):
                point = {"n": n, "f": f}
                study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0, params=point, distributions=space))
    assert ask(study, space) == {"n": 2, "f": 1.0}
    assert ask(study, space) == {"n": 1, "f": 0.0}  # now every point is measured (or running): a repeat


def test_no_repeat_with_every_point_measured_repeats_one_and_warns_once(capsys: pytest.CaptureFixture) -> None:
    space = {"x": CategoricalDistribution(["a", "b"])}
    study = no_repeat_study(space)
    for x in ("a", "b"):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0, params={"x": x}, distributions=space))
    assert ask(study, space)["x"] in ("a", "b")
    assert ask(study, space)["x"] in ("a", "b")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "every point" in line]
    assert warnings == ["[sweep] warning: every point of the search space has been measured: trial 2 repeats one"]


def test_no_repeat_leaves_an_enqueued_trials_params_alone_even_when_measured() -> None:
    space = {"x": CategoricalDistribution([1, 2])}
    study = no_repeat_study(space)
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0, params={"x": 1}, distributions=space))
    study.enqueue_trial({"x": 1})
    assert ask(study, space) == {"x": 1}
    assert ask(study, space) == {"x": 2}


def test_build_pruner_follows_the_config() -> None:
    median = build_pruner(config("sweep.pruner=median", "sweep.pruner_startup_trials=4", "sweep.n_warmup_epochs=3"))
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (4, 3)
    hyper = build_pruner(
        config(
            "sweep.pruner=hyperband", "sweep.n_warmup_epochs=2", "sweep.space.epochs.low=5", "sweep.space.epochs.high=9"
        )
    )
    assert isinstance(hyper, optuna.pruners.HyperbandPruner)
    assert (hyper._min_resource, hyper._max_resource, hyper._reduction_factor) == (2, 9, 3)
    assert isinstance(build_pruner(config("sweep.pruner=none")), optuna.pruners.NopPruner)


def test_load_study_creates_once_then_resumes_and_workers_only_load(tmp_path: Path) -> None:
    cfg = config("sweep.study_name=life", "sweep.direction=minimize", "sweep.sampler=random")
    with pytest.raises(KeyError):
        load_study(cfg, tmp_path)  # a worker does not create the study
    study = load_study(cfg, tmp_path, create=True)
    assert study.study_name == "life" and study.direction == optuna.study.StudyDirection.MINIMIZE
    assert isinstance(study.sampler, NoRepeatSampler) and isinstance(study.pruner, optuna.pruners.MedianPruner)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = load_study(cfg, tmp_path, create=True)  # load_if_exists: the same study, its trials kept
    assert again._study_id == study._study_id and len(again.trials) == 2
    worker = load_study(cfg, tmp_path, worker_index=1)
    assert len(worker.trials) == 2
    expected = optuna.samplers.RandomSampler(seed=sampler_seed(cfg.seed, 2, 1))  # reseeded: 2 trials so far
    probe = optuna.create_study()
    assert worker.sampler.base.sample_independent(probe, probe.ask(), "x", X) == expected.sample_independent(
        probe, probe.ask(), "x", X
    )
    assert len(optuna.get_all_study_summaries(open_storage(cfg, tmp_path))) == 1


def test_load_study_on_sqlite_storage(tmp_path: Path) -> None:
    cfg = config(f"sweep.storage=sqlite:///{tmp_path / 's.db'}", "sweep.study_name=sq", "sweep.sampler=random")
    load_study(cfg, tmp_path, create=True).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    study = load_study(cfg, tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # the committed config's direction
    assert not (tmp_path / ".optuna").exists()


@pytest.mark.slow  # creating and dropping a PostgreSQL database takes seconds
@needs_postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # study.ask
def test_load_study_on_postgresql_creates_once_and_recovers_a_dead_worker(tmp_path: Path, pg_url: str) -> None:
    cfg = config(f"sweep.storage={pg_url}", "sweep.study_name=pg")
    study = load_study(cfg, tmp_path, create=True)
    running(study, dead_token())
    again = load_study(cfg, tmp_path, create=True)
    assert again._study_id == study._study_id
    assert recover_dead_trials(again) == 1
    assert [t.state for t in load_study(cfg, tmp_path).trials] == [TrialState.FAIL, TrialState.WAITING]
    study._storage._backend.engine.dispose()
    again._storage._backend.engine.dispose()
