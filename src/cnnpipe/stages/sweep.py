"""The sweep stage: create (or resume) the study, run the workers, write sweep/ and log the parent run."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from optuna.trial import FrozenTrial, TrialState

from cnnpipe.atomic import atomic_dir, check_replaceable, write_text_atomic
from cnnpipe.config import Config, as_dict, flatten
from cnnpipe.console import info, warn
from cnnpipe.data.preprocess import check_prepared
from cnnpipe.data.store import load_meta
from cnnpipe.errors import CnnpipeError, ConfigError
from cnnpipe.redact import mask_secrets
from cnnpipe.tracking.names import experiment_name, run_label
from cnnpipe.tracking.runs import RunLogger, tracked_run
from cnnpipe.tracking.tags import run_tags
from cnnpipe.tracking.uri import resolve_tracking_uri
from cnnpipe.training.fit import check_pretrained_weights
from cnnpipe.training.trainer import within_tie
from cnnpipe.tuning.objective import VAL_LOSS_ATTR
from cnnpipe.tuning.pool import close_orphaned_trial_runs, run_workers
from cnnpipe.tuning.report import counts, trial_rows, trials_csv, write_plots
from cnnpipe.tuning.storage import TrialRecovery, describe_storage, recover_dead_trials
from cnnpipe.tuning.study import load_study, study_name
from cnnpipe.tuning.worker import run_worker

PARENT_ATTR = "cnnpipe.mlflow_parent_run_id"
BEST_FILE = "best_params.yaml"
OUTPUT_NAMES = ("trials.csv", BEST_FILE, "history.png", "importances.png", "parallel.png")  # all it writes


def _log_parent(run: RunLogger, cfg: Config, best: dict[str, Any], out: Path) -> None:
    if best["best_trial"] is not None:
        run.log_metrics({f"best/{cfg.sweep.metric}": best["best_value"]}, step=0)
        run.set_tags({f"cnnpipe.best.{k}": str(v) for k, v in best["params"].items()})  # tags: change on resume
    run.log_metrics({f"trials/{k}": v for k, v in best["trials"].items()}, step=0)
    run.set_tags({"cnnpipe.best_trial": str(best["best_trial"])})
    for name in OUTPUT_NAMES:
        run.log_artifact(out / name)


def searched_archs(cfg: Config) -> list[str | None]:
    """The architectures trials may build: the search space's `model.arch` choices when it searches that key
    (then params.yaml's model.arch is used by no trial), else model.arch. Several architectures cannot share one
    `model.weights` file: that is refused here, in one line, before any trial."""
    choices: list[str | None] = []
    for p in cfg.sweep.space.values():
        if p.key == "model.arch" and p.type == "categorical":
            choices += [str(c) for c in p.choices or [] if str(c) not in choices]
    if len(choices) > 1 and cfg.model.pretrained and cfg.model.weights:
        raise ConfigError(
            f"model.weights: one weights file cannot fit the {len(choices)} architectures sweep.space searches "
            f"({', '.join(str(c) for c in choices)}); unset model.weights to take each one's from the Hugging Face "
            "cache, or search one architecture"
        )
    return choices or [cfg.model.arch]


def run_sweep(cfg: Config, root: Path, explicit: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The sweep stage. `explicit`: the keys the user set (config.explicit_keys); a tuned key among them is pinned
    at the user's value (left out of the search). With `train.hparams=params` no sweep runs: train would not use it."""
    meta = load_meta(root / cfg.paths.prepared)  # fail early, naming the file, when prepare has not run
    check_replaceable(root / cfg.paths.sweep, OUTPUT_NAMES)  # a folder of someone else's: refused before any trial
    if cfg.train.hparams != "sweep":
        return _skip(cfg, root)
    cfg = pin_explicit(cfg, explicit)
    check_prepared(cfg, meta, str(root / cfg.paths.prepared / "meta.json"))
    for arch in searched_archs(cfg):  # every architecture a trial may draw has usable weights: one line, no trial
        check_pretrained_weights(replace(cfg, model=replace(cfg.model, arch=arch)), meta)
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
            run_workers(cfg, root, run.run_id, study, recovery, deadline)
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
            best_value=float(best.values[0]),  # a COMPLETE trial's objective value
            params=dict(best.params),
            mlflow_trial_run_id=best.user_attrs.get("cnnpipe.mlflow_run_id"),
        )
    return summary
