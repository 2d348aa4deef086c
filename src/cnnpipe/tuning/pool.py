"""Local worker processes on one study (`sweep.workers` > 1): spawned with their share of CPU threads (and GPUs),
reaped as they end, and what a killed one left behind recovered: its trial failed and re-queued, its MLflow run
closed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import TrialState

from cnnpipe.config import Config, as_dict
from cnnpipe.console import warn
from cnnpipe.errors import CnnpipeError
from cnnpipe.threads import cpu_threads
from cnnpipe.tuning.report import counts
from cnnpipe.tuning.storage import TrialRecovery, close_trial_run, recover_dead_trials, study_is_done, worker_pid
from cnnpipe.tuning.worker import run_worker

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


def run_workers(
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
    from cnnpipe.tracking.runs import open_child_runs

    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run_id, tags in open_child_runs(tracking_uri, parent_run_id):
        number = tags.get("cnnpipe.trial_number", "")
        state = states.get(int(number)) if number.isdigit() else None
        if state is None or not state.is_finished():
            continue
        reason = (
            f"optuna trial {number} is {state.name} in study {study.study_name} but its run was left RUNNING "
            "(its worker died)"
        )
        closed += close_trial_run(tracking_uri, run_id, reason)
    return closed
