"""A sweep worker: runs trials on the shared study until it holds `sweep.n_trials` (or time is up).

Also the entry point of the extra local worker processes (`sweep.workers > 1`):
`python -m cnnpipe.tuning.worker --config FILE --root DIR --index I [--parent RUN_ID]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from cnnpipe.config import Config, to_config
from cnnpipe.console import info
from cnnpipe.data.store import load_meta, load_split
from cnnpipe.tracking.datasets import split_inputs
from cnnpipe.tracking.names import experiment_name
from cnnpipe.tuning.objective import TrialObjective
from cnnpipe.tuning.storage import TrialRecovery, recover_dead_trials, requeue, study_is_done
from cnnpipe.tuning.study import load_study, study_name


def progress_line(study: optuna.Study, n_trials: int) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {
        s: sum(1 for t in trials if t.state == s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] + counts[TrialState.FAIL]
    best = ""
    if counts[TrialState.COMPLETE]:
        best = f"  best {study.best_value:.4f} (trial {study.best_trial.number})"
    return f"trial {done} of {n_trials}{best}  pruned {counts[TrialState.PRUNED]}  failed {counts[TrialState.FAIL]}"


def run_worker(
    cfg: Config,
    root: Path,
    parent_run_id: str | None,
    index: int = 0,
    label: str = "sweep",
    deadline: float | None = None,
) -> None:
    """`deadline` (time.monotonic()) overrides `sweep.timeout` counted from now: the stage finishing a study
    after a worker died keeps to the timeout of the whole invocation."""
    study = load_study(cfg, root, worker_index=index)
    recovery = TrialRecovery(cfg.tracking.uri, root)
    prepared, augmented = root / cfg.paths.prepared, root / cfg.paths.augmented
    meta = load_meta(prepared)
    train_file, val_file = augmented / "train.npz", prepared / "val.npz"
    train, val = load_split(train_file, mmap=True, meta=meta), load_split(val_file, mmap=True)
    inputs = split_inputs(cfg.data.name, {"train": (train_file, train), "val": (val_file, val)})
    experiment = experiment_name(cfg)
    objective = TrialObjective(cfg, root, meta, train, val, experiment, study_name(cfg), parent_run_id, inputs)
    objective.label = label
    if deadline is None and cfg.sweep.timeout:
        deadline = time.monotonic() + cfg.sweep.timeout
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while True:
        recover_dead_trials(study, recovery)
        if study_is_done(study, cfg.sweep.n_trials):
            break
        if deadline is not None and time.monotonic() >= deadline:
            info(label, f"sweep.timeout of {cfg.sweep.timeout} s reached")
            break
        objective.current = None
        try:
            # One trial per call: Optuna runs it with heartbeat (RDB), stale-trial checks, and marks a trial
            # that raises (or returns NaN) as failed and goes on.
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        except KeyboardInterrupt:
            # Optuna marked the running trial FAIL; queue its params again so a resumed sweep loses nothing.
            if objective.current is not None:
                trial = study.get_trials(deepcopy=False)[objective.current]
                if trial.state == TrialState.FAIL:
                    requeue(study, trial)
            raise
        info(label, progress_line(study, cfg.sweep.n_trials))


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--parent", default=None)
    args = parser.parse_args()
    from cnnpipe.console import quiet_library_noise

    quiet_library_noise()
    cfg = to_config(yaml.safe_load(args.config.read_text()), source=str(args.config))
    try:
        run_worker(cfg, args.root, args.parent, args.index, label=f"sweep w{args.index}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    _main()
