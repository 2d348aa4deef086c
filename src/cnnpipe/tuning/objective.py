"""One trial: suggest values, train on train/val (never test), report the val metric per epoch for
pruning, and log the trial as a child MLflow run of the study's parent run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
from optuna_integration import PyTorchLightningPruningCallback

from cnnpipe.config import Config, as_dict, flatten, with_values
from cnnpipe.data.store import Split
from cnnpipe.tracking.runs import tracked_run
from cnnpipe.tracking.tags import run_tags
from cnnpipe.training.fit import fit
from cnnpipe.tuning.space import suggest
from cnnpipe.tuning.storage import RUN_ID_ATTR, WORKER_ATTR, this_worker

__all__ = ["RUN_ID_ATTR", "TrialFailed", "TrialObjective", "best_value"]


class TrialFailed(Exception):
    """The trial produced no usable value (NaN, or the metric never reported)."""


def best_value(rows: list[dict[str, float]], metric: str, direction: str) -> float | None:
    values = [r[metric] for r in rows if metric in r and math.isfinite(r[metric])]
    if not values:
        return None
    return max(values) if direction == "maximize" else min(values)


class TrialObjective:
    def __init__(
        self,
        cfg: Config,
        root: Path,
        meta: dict[str, Any],
        train: Split,
        val: Split,
        experiment: str,
        study: str,
        parent_run_id: str | None,
        data_digest: str,
    ) -> None:
        self.cfg, self.root, self.meta, self.train, self.val = cfg, root, meta, train, val
        self.experiment, self.study, self.parent_run_id = experiment, study, parent_run_id
        self.data_digest = data_digest
        self.current: int | None = None  # number of the trial in progress, for interrupt handling

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        trial.set_user_attr(WORKER_ATTR, this_worker())
        cfg = with_values(self.cfg, suggest(trial, self.cfg.sweep.space), source=f"trial {trial.number}")
        tags = {
            **run_tags(self.root, "trial", cfg.data.name, self.data_digest),
            "cnnpipe.study": self.study,
            "cnnpipe.trial_number": str(trial.number),
        }
        state = "failed"
        with tracked_run(
            cfg.tracking.uri,
            self.root,
            self.experiment,
            f"trial-{trial.number}",
            tags,
            parent_run_id=self.parent_run_id,
        ) as run:
            trial.set_user_attr(RUN_ID_ATTR, run.run_id)
            run.log_params(flatten(as_dict(cfg)))
            pruning = PyTorchLightningPruningCallback(trial, monitor=cfg.sweep.metric)
            try:
                result = fit(
                    cfg,
                    self.meta,
                    self.train,
                    self.val,
                    ckpt_dir=None,
                    sinks=[run.log_metrics],
                    callbacks=[pruning],
                    quiet=True,
                    root=self.root,
                )
                pruning.check_pruned()
                value = best_value(result.history, cfg.sweep.metric, cfg.sweep.direction)
                if value is None:
                    raise TrialFailed(f"{cfg.sweep.metric} was never finite")
                run.log_metrics({f"best/{cfg.sweep.metric}": value}, step=len(result.history) - 1)
                state = "complete"
                return value
            except optuna.TrialPruned:
                state = "pruned"
                raise
            except KeyboardInterrupt:
                state = "interrupted"
                raise
            finally:
                run.set_tags({"cnnpipe.trial_state": state})
