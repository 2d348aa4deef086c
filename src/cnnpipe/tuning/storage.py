"""Optuna storage: a journal file on one machine (default), an RDB URL (PostgreSQL) for many.

Dead workers: RDB storage uses Optuna's heartbeat, and a stale trial is failed and re-queued with the
same params. The journal has no heartbeat, so each trial records `host:pid`; a starting worker fails and
re-queues RUNNING trials of this host whose process is gone. Either way no trial stays RUNNING forever,
and its params are tried again, so a killed sweep loses nothing.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cnnpipe.config import Config
from cnnpipe.tracking.uri import store_root

WORKER_ATTR = "cnnpipe.worker"
INTERRUPTED_ATTR = "cnnpipe.interrupted"
HEARTBEAT_S = 10
GRACE_S = 30


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def journal_path(cfg: Config, root: Path) -> Path:
    return store_root(root) / cfg.paths.optuna / "journal.log"


def describe_storage(cfg: Config, root: Path) -> str:
    return cfg.sweep.storage or str(journal_path(cfg, root))


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue the failed trial's params again (marked as a retry of it), without its worker id."""
    clean = copy.deepcopy(trial)
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != WORKER_ATTR}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=3)(study, clean)


def open_storage(cfg: Config, root: Path) -> optuna.storages.BaseStorage:
    url = cfg.sweep.storage
    if url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                failed_trial_callback=requeue,
                engine_kwargs={"pool_pre_ping": True},
            )
    path = journal_path(cfg, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_dead_trials(study: optuna.Study) -> int:
    """Journal storage: fail and re-queue RUNNING trials whose worker process on this host is gone."""
    storage = study._storage
    if isinstance(getattr(storage, "_backend", storage), RDBStorage):
        return 0  # the heartbeat does this for RDB storage
    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get(WORKER_ATTR, ""))
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or not _process_gone(int(pid)):
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker got there first
        requeue(study, trial)
        recovered += 1
    return recovered


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that count toward `n_trials`: all of them, except failed trials that were re-queued
    (their retry counts instead), so an interrupted study ends with exactly `n_trials`."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def study_is_done(study: optuna.Study, n_trials: int) -> bool:
    """The budget is used and no trial waits to run. A re-queued trial counts toward the budget before it
    runs, so an interrupted last trial leaves the budget full: without the waiting check a resumed sweep
    would stop with that trial never run."""
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    return not waiting and budget_used(trials) >= n_trials
