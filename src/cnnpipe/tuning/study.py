"""Create or load the study: name, sampler and pruner from config, with every argument explicit
(Optuna 5 changed TPE's defaults to multivariate with constant_liar)."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from cnnpipe.config import Config, as_dict, flatten
from cnnpipe.console import warn
from cnnpipe.errors import ConfigError
from cnnpipe.tuning.space import distributions, epoch_range
from cnnpipe.tuning.storage import open_storage

# Keys that do not change what a trial computes: a study with a different value of these is the same study.
_NOT_IN_IDENTITY = ("n_trials", "timeout", "workers", "storage", "study_name")
_TRAIN_NOT_IN_IDENTITY = ("train.hparams", "train.resume")  # what the train stage does with the result


def study_name(cfg: Config) -> str:
    """`sweep.study_name`, else `cnnpipe-<dataset>-<hash>` of everything a trial depends on, so re-running
    the same config resumes its study and a changed model or space starts a new one. The keys the study tunes
    are left out: every trial sets them, so their values in params.yaml change nothing a trial computes."""
    if cfg.sweep.study_name:
        return cfg.sweep.study_name
    tree = as_dict(cfg)
    tree.pop("tracking", None)
    tree.pop("paths", None)
    tree["sweep"] = {k: v for k, v in tree["sweep"].items() if k not in _NOT_IN_IDENTITY}
    flat = flatten(tree)
    for key in (*(p.key for p in cfg.sweep.space.values()), *_TRAIN_NOT_IN_IDENTITY):
        flat.pop(key, None)
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"cnnpipe-{cfg.data.name}-{digest}"


def sampler_seed(seed: int, trials_so_far: int, worker_index: int) -> int:
    """The sampler's seed: `seed + worker_index` for a new study (distinct streams per worker, reproducible),
    and for a resumed study a hash of (seed, trials already in it, worker index). A sampler is rebuilt in
    every process and its random state is not stored in the study, so with the plain seed a resumed study
    replays the stream from its start: the random sampler and TPE's start-up trials re-propose the first
    trials' exact params."""
    if trials_so_far == 0:
        return seed + worker_index
    text = f"cnnpipe-sampler:{seed}:{trials_so_far}:{worker_index}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "big")


def build_sampler(cfg: Config, worker_index: int = 0, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    seed = sampler_seed(cfg.seed, trials_so_far, worker_index)
    sw = cfg.sweep
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        base: optuna.samplers.BaseSampler
        if sw.sampler == "tpe":
            base = optuna.samplers.TPESampler(
                n_startup_trials=sw.n_startup_trials, seed=seed, multivariate=True, constant_liar=sw.workers > 1
            )
        elif sw.sampler == "random":
            base = optuna.samplers.RandomSampler(seed=seed)
        elif sw.sampler == "cmaes":
            base = optuna.samplers.CmaEsSampler(
                n_startup_trials=sw.n_startup_trials,
                seed=seed,
            )
        else:
            base = optuna.samplers.GPSampler(n_startup_trials=sw.n_startup_trials, seed=seed)
    return NoRepeatSampler(base, distributions(sw.space), seed=seed)


MEASURED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
GRID_LIMIT = 10_000  # finite spaces up to this many points: pick an unmeasured one when draws keep repeating


class NoRepeatSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that a trial is not spent on a point already measured.

    Optuna's samplers do not avoid repeats. Re-seeding on resume (`sampler_seed`) removes the systematic ones;
    this wrapper is the guard for the rest (a small categorical or stepped space, TPE converging, two machines
    with the same seed): it draws the whole point at once (all of `space` as the relative search space: the
    base sampler's relative params, then its independent ones), and when the point equals the params of a
    COMPLETE, PRUNED or RUNNING trial (measured, or being measured) it draws again, up to `tries` times. If
    every draw repeats, a finite space gives a random point not measured yet; a space with every point
    measured gives the repeat, with a warning (the study asked for more trials than the space has points).

    The alternatives were worse: returning the earlier trial's value, or pruning the repeat, spends a trial
    of `n_trials` on nothing. A re-queued trial (a retry of a trial whose worker died or was interrupted,
    `requeue`, `enqueue_trial`) keeps its params: it was never measured, so it is not a repeat, and the wrapper
    does not draw for it at all."""

    def __init__(
        self, base: optuna.samplers.BaseSampler, space: dict[str, BaseDistribution], seed: int, tries: int = 8
    ) -> None:
        self.base, self.space, self.tries = base, dict(space), tries
        self._rng = random.Random(seed)
        self._warned = False

    def __str__(self) -> str:
        return f"NoRepeatSampler({self.base})"

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if trial.system_attrs.get("fixed_params") or set(self.space) <= set(trial.params):
            return {}  # an enqueued trial or a retry (`requeue`): its params are given
        return dict(self.space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        measured = {self._key(t.params) for t in study.get_trials(deepcopy=False, states=MEASURED)}
        measured.discard(None)
        point = self._draw(study, trial)
        for _ in range(self.tries - 1):
            if self._key(point) not in measured:
                return point
            point = self._draw(study, trial)
        if self._key(point) not in measured:
            return point
        free = self._unmeasured(measured)
        if free:
            return self._rng.choice(free)
        if not self._warned:
            self._warned = True
            warn("sweep", f"every point of the search space has been measured: trial {trial.number} repeats one")
        return point

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any | None) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self._rng = random.Random()

    def _draw(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        relative = self.base.infer_relative_search_space(study, trial)
        point = dict(self.base.sample_relative(study, trial, relative)) if relative else {}
        for name, dist in self.space.items():
            if name in point:
                continue
            if dist.single():  # one possible value: Optuna never asks a sampler for it
                point[name] = dist.to_external_repr(dist.low if hasattr(dist, "low") else 0)
            else:
                point[name] = self.base.sample_independent(study, trial, name, dist)
        return {name: point[name] for name in self.space}

    def _key(self, params: dict[str, Any]) -> tuple[float, ...] | None:
        """The point in Optuna's internal representation (floats; a categorical's choice index), so that
        numpy and Python numbers compare equal. None for a trial without all of the space's params."""
        try:
            return tuple(float(dist.to_internal_repr(params[name])) for name, dist in self.space.items())
        except (KeyError, ValueError, TypeError):
            return None

    def _unmeasured(self, measured: set[tuple[float, ...] | None]) -> list[dict[str, Any]]:
        """The points of a finite space (categorical, int, stepped float) not in `measured`; [] otherwise."""
        axes: list[list[Any]] = []
        size = 1
        for dist in self.space.values():
            if isinstance(dist, CategoricalDistribution):
                values: list[Any] = list(dist.choices)
            elif isinstance(dist, IntDistribution) and not dist.log:
                values = list(range(dist.low, dist.high + 1, dist.step))
            elif isinstance(dist, IntDistribution):
                values = list(range(dist.low, dist.high + 1))
            elif isinstance(dist, FloatDistribution) and dist.step is not None:
                n = round((dist.high - dist.low) / dist.step) + 1
                values = [dist.low + i * dist.step for i in range(n)]
            else:
                return []
            size *= len(values)
            if size > GRID_LIMIT:
                return []
            axes.append(values)
        points = [dict(zip(self.space, combo, strict=True)) for combo in itertools.product(*axes)]
        return [p for p in points if self._key(p) not in measured]


def build_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    sw = cfg.sweep
    if sw.pruner == "median":
        # Its own startup count: waiting for the sampler's random startup trials left the pruner idle exactly
        # while the best trial was often found (bench/findings.md).
        return optuna.pruners.MedianPruner(n_startup_trials=sw.pruner_startup_trials, n_warmup_steps=sw.n_warmup_epochs)
    if sw.pruner == "hyperband":
        low, high = epoch_range(sw.space, cfg.train.epochs)
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, min(low, sw.n_warmup_epochs or 1)), max_resource=high, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def load_study(cfg: Config, root: Path, worker_index: int = 0, create: bool = False) -> optuna.Study:
    """The study on the configured storage (created when `create`; workers only load), its sampler seeded
    from how many trials it already holds (see `sampler_seed`)."""
    storage = open_storage(cfg, root)
    name = study_name(cfg)
    sampler, pruner = build_sampler(cfg, worker_index), build_pruner(cfg)
    if create:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction=optuna.study.StudyDirection[cfg.sweep.direction.upper()],
            load_if_exists=True,
        )
        if study.direction.name.lower() != cfg.sweep.direction:  # only a pinned name: the hash covers direction
            raise ConfigError(
                f"sweep.direction is {cfg.sweep.direction}, but study {name!r} in this storage was created to "
                f"{study.direction.name.lower()}: set another sweep.study_name (or leave it empty) for a new study"
            )
    else:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    so_far = len(study.get_trials(deepcopy=False))
    if so_far:
        study.sampler = build_sampler(cfg, worker_index, so_far)
    return study
