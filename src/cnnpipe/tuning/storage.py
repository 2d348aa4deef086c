"""Optuna storage: a journal file on one machine (default), an RDB URL (PostgreSQL) for many.

Dead workers: each trial records its worker as `host:pid:start` (`cnnpipe.processes.owner_token`). A RUNNING
trial whose worker on this host is gone (exited, killed, or a zombie its parent has not reaped yet) is failed
and re-queued with the same params by the next worker or stage on this host, whatever the storage. RDB storage
also has Optuna's heartbeat, which does the same for workers on other hosts once their heartbeat is
`GRACE_S` seconds old (`CNNPIPE_HEARTBEAT_GRACE_S` overrides it, e.g. for tests). Either way no trial stays
RUNNING forever, its params are tried again, so a killed sweep loses nothing, and the trial's MLflow child run,
which its dead worker could not end, is ended KILLED with a `cnnpipe.end_reason` tag saying why.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cnnpipe.config import Config, store_root
from cnnpipe.console import warn
from cnnpipe.errors import ConfigError
from cnnpipe.processes import owner_alive, owner_token
from cnnpipe.redact import mask_secrets
from cnnpipe.tracking.uri import resolve_tracking_uri

WORKER_ATTR = "cnnpipe.worker"
RUN_ID_ATTR = "cnnpipe.mlflow_run_id"  # the trial's MLflow child run
SURPLUS_ATTR = "cnnpipe.surplus"  # a trial started past the budget by a racing worker: pruned before training
HEARTBEAT_S = 10
GRACE_S = 30
# A worker claims its trial (WORKER_ATTR) first thing, milliseconds after Optuna created it RUNNING. A journal
# trial (one host) still unclaimed after this long lost its worker in that window (killed while writing the claim,
# a fresh-clone run under load showed it): it is failed and re-queued like any dead worker's.
UNCLAIMED_GRACE_S = 60
GRACE_ENV = "CNNPIPE_HEARTBEAT_GRACE_S"


def this_worker() -> str:
    """`host:pid:start` of this process (older studies hold `host:pid`: `owner_alive` reads both)."""
    return owner_token()


def heartbeat_timing() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: `GRACE_S`, or `$CNNPIPE_HEARTBEAT_GRACE_S` (a positive
    integer; tests set a few seconds) with the interval shortened to fit."""
    text = os.environ.get(GRACE_ENV, "").strip()
    grace = int(text) if text.isdigit() and int(text) > 0 else GRACE_S
    return min(HEARTBEAT_S, max(1, grace // 3)), grace


def worker_pid(trial: FrozenTrial) -> int | None:
    """The pid of the trial's worker when it ran on this host, else None."""
    host, _, rest = str(trial.user_attrs.get(WORKER_ATTR, "")).partition(":")
    pid = rest.partition(":")[0]
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def close_trial_run(tracking_uri: str, run_id: str, reason: str) -> bool:
    """End the MLflow run `run_id` as KILLED with tag `cnnpipe.end_reason`, if it is still RUNNING (a run that
    ended on its own keeps its status). True when it closed the run. Never raises: closing is cleanup, and a
    store that cannot be reached must not stop the trial's recovery. The one place the tuning package
    closes runs (through `cnnpipe.tracking`)."""
    from cnnpipe.tracking.runs import close_run_at

    try:
        return close_run_at(tracking_uri, run_id, reason)
    except Exception as exc:  # any store error: say so and go on
        warn("sweep", f"could not close MLflow run {run_id}: {type(exc).__name__}: {str(exc)[:200]}")
        return False


class TrialRecovery:
    """What happens to a trial whose worker died: it is failed (by the caller, or by Optuna's heartbeat), its
    params are queued again, and its MLflow child run is closed. A callable class, so that RDB storage can
    call it as `heartbeat_stale_trial_callback(study, trial)` with the tracking store at hand."""

    def __init__(self, tracking_uri: str | None, root: Path) -> None:
        self.tracking_uri, self.root = tracking_uri, root

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's heartbeat failed `trial` (no heartbeat for the grace period)."""
        owner = trial.user_attrs.get(WORKER_ATTR, "unknown")
        self.after_failure(study, trial, f"its worker {owner} stopped sending heartbeats")

    def after_failure(self, study: optuna.Study, trial: FrozenTrial, why: str) -> None:
        requeue(study, trial)
        self.close_run(trial, f"optuna trial {trial.number} failed and was re-queued: {why}")

    def close_run(self, trial: FrozenTrial, reason: str) -> bool:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if not run_id:
            return False  # killed before its run started; pool.close_orphaned_trial_runs catches the rest
        return close_trial_run(resolve_tracking_uri(self.tracking_uri, self.root), str(run_id), reason)


def journal_path(cfg: Config, root: Path) -> Path:
    return store_root(root) / cfg.paths.optuna / "journal.log"


def describe_storage(cfg: Config, root: Path) -> str:
    return cfg.sweep.storage or str(journal_path(cfg, root))


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue the failed trial's params again (marked as a retry of it), without its worker and run ids."""
    clean = copy.deepcopy(trial)
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (WORKER_ATTR, RUN_ID_ATTR)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=3)(study, clean)


def open_storage(cfg: Config, root: Path) -> optuna.storages.BaseStorage:
    url = cfg.sweep.storage
    if url:
        interval, grace = heartbeat_timing()
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=interval,
                    grace_period=grace,
                    heartbeat_stale_trial_callback=TrialRecovery(cfg.tracking.uri, root),
                    engine_kwargs={"pool_pre_ping": True},
                )
        except (SQLAlchemyError, ImportError) as exc:  # a malformed URL, no server, no driver for the dialect
            reason = " ".join(str(exc).split("\n")[0].split())[:300]
            raise ConfigError(
                f"sweep.storage: cannot open {mask_secrets(url)}: {type(exc).__name__}: {reason}"
            ) from exc
    path = journal_path(cfg, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def recover_dead_trials(
    study: optuna.Study, recovery: TrialRecovery | None = None, now: datetime.datetime | None = None
) -> int:
    """Fail and re-queue RUNNING trials whose worker process on this host is gone (a zombie counts as gone),
    closing their MLflow runs; RDB storage: also trials whose heartbeat went stale (workers on other hosts);
    journal storage: also trials still unclaimed `UNCLAIMED_GRACE_S` after they started (`now`: for tests).
    `recovery`: the storage's own heartbeat callback when it is a `TrialRecovery`, else the run is not closed.
    Returns how many trials it recovered (another worker may get to a trial first: it is not counted)."""
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    if recovery is None and isinstance(backend, RDBStorage):
        callback = backend.get_heartbeat_stale_trial_callback()
        recovery = callback if isinstance(callback, TrialRecovery) else None
    recovered = 0
    if isinstance(backend, RDBStorage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # the heartbeat callback re-queues and closes
        retried = {t.system_attrs.get("failed_trial") for t in study.get_trials(deepcopy=False)}
        recovered += len(before & retried)  # (a trial that merely failed meanwhile is not re-queued)
    now = now or datetime.datetime.now()  # Optuna's datetime_start is naive local time
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get(WORKER_ATTR, ""))
        why = f"its worker {owner} is no longer running"
        if not owner:
            started = trial.datetime_start
            unclaimed = started is not None and (now - started).total_seconds() > UNCLAIMED_GRACE_S
            if isinstance(backend, RDBStorage) or not unclaimed:
                continue  # not yet claimed by its worker (RDB: maybe on another host, the heartbeat's job)
            why = f"no worker claimed it within {UNCLAIMED_GRACE_S} s"
        elif owner_alive(owner) is not False:
            continue  # alive, or on another host (the heartbeat's job)
        try:
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL) is False:
                continue
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker got there first
        if recovery is None:
            requeue(study, trial)
        else:
            recovery.after_failure(study, trial, why)
        recovered += 1
    return recovered


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that count toward `n_trials`: all of them, except failed trials that were re-queued
    (their retry counts instead) and surplus trials (`is_surplus`), so a study ends with exactly `n_trials`."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(
        1
        for t in trials
        if not (t.state == TrialState.FAIL and t.number in retried) and not t.user_attrs.get(SURPLUS_ATTR)
    )


def is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Trial `number` was created when the trials before it already filled the budget: two workers checked the
    budget at the same moment and both started one (the check and Optuna's trial creation are not one atomic
    step, on any storage). Such a trial is stopped before it trains and does not count."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}  # retries name their original
    earlier = [t for t in trials if t.number < number and t.number not in retried]
    return budget_used(earlier) >= n_trials


def study_is_done(study: optuna.Study, n_trials: int) -> bool:
    """The budget is used and no trial waits to run. A re-queued trial counts toward the budget before it
    runs, so an interrupted last trial leaves the budget full: without the waiting check a resumed sweep
    would stop with that trial never run."""
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    return not waiting and budget_used(trials) >= n_trials
