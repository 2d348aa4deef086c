"""Create or load the study: name, sampler and pruner from config, with every argument explicit
(Optuna 5 changed TPE's defaults to multivariate with constant_liar)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import optuna

from cnnpipe.config import Config, as_dict
from cnnpipe.tuning.space import epoch_range
from cnnpipe.tuning.storage import open_storage

# Keys that do not change what a trial computes: a study with a different value of these is the same study.
_NOT_IN_IDENTITY = ("n_trials", "timeout", "workers", "storage", "study_name")


def study_name(cfg: Config) -> str:
    """`sweep.study_name`, else `cnnpipe-<dataset>-<hash>` of everything a trial depends on, so re-running
    the same config resumes its study and a changed model or space starts a new one."""
    if cfg.sweep.study_name:
        return cfg.sweep.study_name
    tree = as_dict(cfg)
    tree.pop("tracking", None)
    tree.pop("paths", None)
    tree["sweep"] = {k: v for k, v in tree["sweep"].items() if k not in _NOT_IN_IDENTITY}
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"cnnpipe-{cfg.data.name}-{digest}"


def build_sampler(cfg: Config, worker_index: int = 0) -> optuna.samplers.BaseSampler:
    seed = cfg.seed + worker_index  # distinct streams per worker, reproducible per worker
    sw = cfg.sweep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if sw.sampler == "tpe":
            return optuna.samplers.TPESampler(
                n_startup_trials=sw.n_startup_trials, seed=seed, multivariate=True, constant_liar=sw.workers > 1
            )
        if sw.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if sw.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(
                n_startup_trials=sw.n_startup_trials,
                seed=seed,
            )
        return optuna.samplers.GPSampler(n_startup_trials=sw.n_startup_trials, seed=seed)


def build_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    sw = cfg.sweep
    if sw.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sw.n_startup_trials, n_warmup_steps=sw.n_warmup_epochs)
    if sw.pruner == "hyperband":
        low, high = epoch_range(sw.space, cfg.train.epochs)
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, min(low, sw.n_warmup_epochs or 1)), max_resource=high, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def load_study(cfg: Config, root: Path, worker_index: int = 0, create: bool = False) -> optuna.Study:
    """The study on the configured storage (created when `create`; workers only load)."""
    storage = open_storage(cfg, root)
    name = study_name(cfg)
    kwargs = {
        "study_name": name,
        "storage": storage,
        "sampler": build_sampler(cfg, worker_index),
        "pruner": build_pruner(cfg),
    }
    if create:
        return optuna.create_study(direction=cfg.sweep.direction, load_if_exists=True, **kwargs)  # type: ignore[arg-type]
    return optuna.load_study(**kwargs)  # type: ignore[arg-type]
