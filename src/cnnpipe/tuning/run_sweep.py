"""The sweep stage: create (or resume) the study, run the workers, write sweep/ and log the parent run."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from cnnpipe.atomic import atomic_dir, check_replaceable, write_text_atomic
from cnnpipe.config import Config, as_dict, flatten
from cnnpipe.console import info, warn
from cnnpipe.data.store import load_meta
from cnnpipe.errors import CnnpipeError, ConfigError
from cnnpipe.redact import mask_secrets
from cnnpipe.threads import cpu_threads
from cnnpipe.tracking.names import experiment_name, run_label
from cnnpipe.tracking.runs import RunLogger, tracked_run
from cnnpipe.tracking.tags import run_tags
from cnnpipe.tracking.uri import resolve_tracking_uri
from cnnpipe.training.trainer import within_tie
from cnnpipe.tuning.objective import VAL_LOSS_ATTR
from cnnpipe.tuning.report import counts, trial_rows, trials_csv, write_plots
from cnnpipe.tuning.storage import (
    TrialRecovery,
    close_trial_run,
    describe_storage,
    recover_dead_trials,
    study_is_done,
    worker_pid,
)
from cnnpipe.tuning.study import load_study, study_name
from cnnpipe.tuning.worker import run_worker

PARENT_ATTR = "cnnpipe.mlflow_parent_run_id"
BEST_FILE = "best_params.yaml"
OUTPUT_NAMES = ("trials.csv", BEST_FILE, "history.png", "importances.png", "parallel.png")  # all it writes
POLL_S = 0.5  # how often the stage looks at its worker processes


def worker_env(index: int, threads: int, gpus: int) -> dict[str, str]:
    """Environment of local worker `index`: its share of CPU threads (`cnnpipe.threads.cpu_threads` with
    `sweep.workers` processes, in OMP_NUM_THREADS before the worker loads torch), and on a machine with several
    GPUs its own GPU (round robin), so workers never share a device."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if gpus > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    return env


@dataclass
class WorkerExit:
    index: int
    pid: int
    code: int  # Popen.returncode: negative = killed by that signal

    @property
    def signal_name(self) -> str | None:
        if self.code >= 0:
            return None
        try:
            return signal.Signals(-self.code).name
        except ValueError:
            return f"signal {-self.code}"


def _spawn_workers(
    cfg: Config, root: Path, parent_run_id: str, study: Any, recovery: TrialRecovery
) -> list[WorkerExit]:
    """`sweep.workers` local processes on the one study, CPU threads (and GPUs) shared out between them.

    The workers are reaped as soon as they end (polled, not waited for in order): a killed worker must not
    linger as a zombie, and its trial is failed and re-queued at once (the other workers then run it)."""
    import torch

    threads = cpu_threads(cfg, processes=cfg.sweep.workers)  # trainer.threads, OMP_NUM_THREADS, or a share
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with tempfile.TemporaryDirectory(prefix="cnnpipe-sweep-") as tmp:
        cfg_file = Path(tmp) / "config.yaml"
        tree = as_dict(cfg)
        tree["trainer"]["threads"] = threads
        cfg_file.write_text(yaml.safe_dump(tree))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cnnpipe.tuning.worker",
                    "--config",
                    str(cfg_file),
                    "--root",
                    str(root),
                    "--index",
                    str(i),
                    "--parent",
                    parent_run_id,
                ],
                env=worker_env(i, threads, gpus),
            )
            for i in range(cfg.sweep.workers)
        ]
        exits: dict[int, WorkerExit] = {}
        try:
            while len(exits) < len(procs):
                for i, p in enumerate(procs):
                    if i not in exits and p.poll() is not None:
                        exits[i] = WorkerExit(i, p.pid, p.returncode)
                        if p.returncode < 0:
                            recover_dead_trials(study, recovery)
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)  # each worker fails and re-queues its running trial
            for p in procs:
                p.wait()
            recover_dead_trials(study, recovery)
            raise
    return [exits[i] for i in range(len(procs))]


def _run_workers(
    cfg: Config, root: Path, parent_run_id: str, study: Any, recovery: TrialRecovery, deadline: float | None
) -> None:
    """Workers were killed (SIGKILL, the OOM killer...): their trials are failed and re-queued; what the
    surviving workers did not run (they may have ended before the kill, their budget full with the dead
    worker's RUNNING trial counted), this process runs. All workers dead, or another exit code: one line."""
    exits = _spawn_workers(cfg, root, parent_run_id, study, recovery)
    recover_dead_trials(study, recovery)
    killed = [e for e in exits if e.signal_name]
    failed = [e for e in exits if e.code > 0]
    if failed:
        codes = [e.code for e in exits]
        raise CnnpipeError(f"sweep worker(s) exited with codes {codes}; the study can be resumed by re-running")
    if killed and len(killed) == len(exits):
        how = ", ".join(f"worker {e.index} by {e.signal_name}" for e in killed)
        raise CnnpipeError(f"all {len(exits)} sweep workers died ({how}); the study can be resumed by re-running")
    timed_out = deadline is not None and time.monotonic() >= deadline
    if killed and not timed_out and not study_is_done(study, cfg.sweep.n_trials):
        run_worker(cfg, root, parent_run_id, label="sweep", deadline=deadline)
    if not killed:
        return
    stuck = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if worker_pid(t)]
    if stuck or (not timed_out and not study_is_done(study, cfg.sweep.n_trials)):
        how = ", ".join(f"worker {e.index} by {e.signal_name}" for e in killed)
        raise CnnpipeError(
            f"the study could not be finished after {how} ({counts(study)}, still running here: {stuck}); "
            "the study can be resumed by re-running"
        )
    for e in killed:
        warn("sweep", _dead_worker_line(study, e))


def _dead_worker_line(study: Any, dead: WorkerExit) -> str:
    """`worker N died by signal SIGKILL and its trial T was re-run (as trial R)`, or what happened instead."""
    trials = study.get_trials(deepcopy=False)
    own = [t for t in trials if worker_pid(t) == dead.pid and t.state == TrialState.FAIL]
    head = f"worker {dead.index} died by signal {dead.signal_name}"
    if not own:
        return f"{head} between trials; the other workers finished the study"
    parts = []
    for t in own:
        retries = [r for r in trials if r.system_attrs.get("failed_trial") == t.number]
        done = [r for r in retries if r.state.is_finished()]
        parts.append(
            f"its trial {t.number} was re-run (as trial {done[0].number})"
            if done
            else f"its trial {t.number} was not re-run"
        )
    return f"{head} and {'; '.join(parts)}"


def close_orphaned_trial_runs(study: Any, tracking_uri: str, parent_run_id: str) -> int:
    """Close the RUNNING child runs of the sweep's parent run whose Optuna trial has finished: their worker
    died before it could end them (with the trial's recovery, or before the trial recorded its run id).
    A live worker ends its run before Optuna records the trial's state, so this never closes a run in use.
    Returns how many it closed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = 0
    for r in runs:
        number = r.data.tags.get("cnnpipe.trial_number", "")
        state = states.get(int(number)) if number.isdigit() else None
        if state is None or not state.is_finished():
            continue
        reason = (
            f"optuna trial {number} is {state.name} in study {study.study_name} but its run was left RUNNING "
            "(its worker died)"
        )
        closed += close_trial_run(tracking_uri, r.info.run_id, reason)
    return closed


def _log_parent(run: RunLogger, cfg: Config, best: dict[str, Any], out: Path) -> None:
    if best["best_trial"] is not None:
        run.log_metrics({f"best/{cfg.sweep.metric}": best["best_value"]}, step=0)
        run.set_tags({f"cnnpipe.best.{k}": str(v) for k, v in best["params"].items()})  # tags: change on resume
    run.log_metrics({f"trials/{k}": v for k, v in best["trials"].items()}, step=0)
    run.set_tags({"cnnpipe.best_trial": str(best["best_trial"])})
    for name in OUTPUT_NAMES:
        run.log_artifact(out / name)


def run_sweep(cfg: Config, root: Path, explicit: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The sweep stage. `explicit`: the keys the user set (config.explicit_keys); a tuned key among them is pinned
    at the user's value (left out of the search). With `train.hparams=params` no sweep runs: train would not use it."""
    load_meta(root / cfg.paths.prepared)  # fail early, naming the file, when prepare has not run
    check_replaceable(root / cfg.paths.sweep, OUTPUT_NAMES)  # a folder of someone else's: refused before any trial
    if cfg.train.hparams != "sweep":
        return _skip(cfg, root)
    cfg = pin_explicit(cfg, explicit)
    name = study_name(cfg)
    storage = describe_storage(cfg, root)
    if cfg.sweep.workers > 1 and storage.startswith("sqlite"):
        warn("sweep", "SQLite storage is not safe for concurrent workers; use the journal default or PostgreSQL")
    study = load_study(cfg, root, create=True)
    started = time.monotonic()
    recovery = TrialRecovery(cfg.tracking.uri, root)
    recovered = recover_dead_trials(study, recovery)
    if recovered:
        info("sweep", f"re-queued {recovered} trial(s) left running by a worker that died")
    experiment = experiment_name(cfg)
    tags = {
        **run_tags(root, "sweep", cfg.data.name, ""),
        "cnnpipe.study": name,
        "cnnpipe.optuna_storage": mask_secrets(storage),
    }
    info(
        "sweep",
        f"study {name} ({len(study.trials)} trials so far, {cfg.sweep.n_trials} in total) in {mask_secrets(storage)}",
    )
    with tracked_run(
        cfg.tracking.uri,
        root,
        experiment,
        f"sweep-{run_label()}",
        tags,
        reopen_run_id=study.user_attrs.get(PARENT_ATTR),
    ) as run:
        study.set_user_attr(PARENT_ATTR, run.run_id)
        run.log_params(_sweep_params(cfg), only_new=True)
        run.set_tags({f"cnnpipe.sweep.{k}": str(getattr(cfg.sweep, k)) for k in ("n_trials", "timeout", "workers")})
        if cfg.sweep.workers == 1:
            run_worker(cfg, root, run.run_id)
        else:
            deadline = started + cfg.sweep.timeout if cfg.sweep.timeout else None
            _run_workers(cfg, root, run.run_id, study, recovery, deadline)
        closed = close_orphaned_trial_runs(study, resolve_tracking_uri(cfg.tracking.uri, root), run.run_id)
        if closed:
            info("sweep", f"closed {closed} MLflow trial run(s) left RUNNING by a worker that died")
        best = _best(study, cfg, name, storage, run.run_id)
        out = root / cfg.paths.sweep
        with atomic_dir(out, OUTPUT_NAMES) as tmp:
            write_text_atomic(tmp / "trials.csv", trials_csv(trial_rows(study)))
            write_text_atomic(tmp / BEST_FILE, yaml.safe_dump(best, sort_keys=False))
            write_plots(study, tmp)
        _log_parent(run, cfg, best, out)
    if best["best_trial"] is None:
        raise CnnpipeError(f"no trial of study {name} completed ({best['trials']}); see {out / 'trials.csv'}")
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    info("sweep", f"best {cfg.sweep.metric} {best['best_value']:.4f} (trial {best['best_trial']}): {shown}")
    return best


def pin_explicit(cfg: Config, explicit: frozenset[str]) -> Config:
    """`cfg` with the space's entries for keys the user set left out: `dvc exp run -S optim.lr=0.01` pins the
    learning rate at 0.01 and the study searches the rest (a study of its own: pinned values are in its name)."""
    pinned = {name: p for name, p in cfg.sweep.space.items() if p.key in explicit}
    if not pinned:
        return cfg
    values = flatten(as_dict(cfg))
    left = {name: p for name, p in cfg.sweep.space.items() if name not in pinned}
    shown = ", ".join(f"{p.key}={values[p.key]}" for p in pinned.values())
    if not left:
        raise ConfigError(
            f"sweep.space: every key it tunes is set by you ({shown}), so there is nothing to search; "
            "unset one, or set train.hparams=params to train without a sweep"
        )
    info("sweep", f"pinned by you: {shown}; searching {', '.join(p.key for p in left.values())}")
    return replace(cfg, sweep=replace(cfg.sweep, space=left))


def _skip(cfg: Config, root: Path) -> dict[str, Any]:
    """train.hparams=params: train will not read a sweep result, so none is computed (a sweep on a user's
    folder can take hours). sweep/ says so, and train's dependency on it is satisfied."""
    reason = "train.hparams=params: train uses params.yaml, so no sweep was run"
    info("sweep", f"{reason} (set train.hparams=sweep to run one)")
    summary = {"skipped": reason, "params": {}}
    with atomic_dir(root / cfg.paths.sweep, OUTPUT_NAMES) as tmp:
        write_text_atomic(tmp / BEST_FILE, yaml.safe_dump(summary, sort_keys=False))
    return summary


def _sweep_params(cfg: Config) -> dict[str, Any]:
    """What defines the study (per-invocation settings such as n_trials go into tags: they may change)."""
    skip = ("paths.", "tracking.", "sweep.n_trials", "sweep.timeout", "sweep.workers", "sweep.storage")
    return {k: v for k, v in flatten(as_dict(cfg)).items() if not k.startswith(skip)}


def best_trial(study: Any, cfg: Config) -> FrozenTrial:
    """The complete trial best on `sweep.metric`; a tie goes to the lower validation loss at its best epoch
    (Optuna's own best_trial takes the first). When every complete trial ties, one line says the metric cannot
    tell them apart."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = -1.0 if cfg.sweep.direction == "maximize" else 1.0
    top = min(sign * t.value for t in complete)
    tied = [t for t in complete if within_tie(sign * t.value, top)]
    best = min(tied, key=lambda t: (float(t.user_attrs.get(VAL_LOSS_ATTR, math.inf)), t.number))
    if len(complete) > 1 and len(tied) == len(complete):
        warn(
            "sweep",
            f"all {len(complete)} complete trials tie on {cfg.sweep.metric} = {best.value:.4g}: the lowest val/loss "
            f"picked trial {best.number}; a larger validation split or sweep.metric=val/loss would tell them apart",
        )
    return best


def _best(study: Any, cfg: Config, name: str, storage: str, parent_run_id: str) -> dict[str, Any]:
    n = counts(study)
    summary: dict[str, Any] = {
        "study": name,
        "storage": mask_secrets(storage),
        "metric": cfg.sweep.metric,
        "direction": cfg.sweep.direction,
        "best_trial": None,
        "best_value": None,
        "params": {},
        "mlflow_parent_run_id": parent_run_id,
        "mlflow_trial_run_id": None,
        "trials": {k: n[k] for k in ("total", "complete", "pruned", "failed")},
    }
    if n["complete"]:
        best = best_trial(study, cfg)
        summary.update(
            best_trial=best.number,
            best_value=float(best.value),
            params=dict(best.params),
            mlflow_trial_run_id=best.user_attrs.get("cnnpipe.mlflow_run_id"),
        )
    return summary
