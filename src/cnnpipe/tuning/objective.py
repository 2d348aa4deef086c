"""One trial: suggest values, train on train/val (never test), report the val metric per epoch for
pruning, and log the trial as a child MLflow run of the study's parent run."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState

from cnnpipe.config import Config, as_dict, flatten, with_values
from cnnpipe.console import info
from cnnpipe.data.store import Split
from cnnpipe.tracking.datasets import SplitInput, combined_digest
from cnnpipe.tracking.runs import tracked_run
from cnnpipe.tracking.tags import run_tags
from cnnpipe.training.fit import fit, log_class_balance
from cnnpipe.training.trainer import TIEBREAK, within_tie
from cnnpipe.tuning.space import suggest
from cnnpipe.tuning.storage import RUN_ID_ATTR, SURPLUS_ATTR, WORKER_ATTR, is_surplus, this_worker

__all__ = ["RUN_ID_ATTR", "TrialFailed", "TrialObjective", "best_row"]

VAL_LOSS_ATTR = "cnnpipe.val_loss"  # val/loss at the trial's best epoch: breaks ties between trials


class TrialFailed(Exception):
    """The trial produced no usable value (NaN, or the metric never reported)."""


def best_row(rows: list[dict[str, float]], metric: str, direction: str) -> dict[str, float] | None:
    """The epoch best on `metric` (finite values only); a tie goes to the lower validation loss, as the train
    stage's checkpoint does: on a small validation split accuracy saturates while the loss still improves."""
    finite = [r for r in rows if metric in r and math.isfinite(r[metric])]
    if not finite:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    top = min(sign * r[metric] for r in finite)
    return min((r for r in finite if within_tie(sign * r[metric], top)), key=_loss)


def _loss(row: dict[str, float]) -> float:
    loss = row.get(TIEBREAK, math.inf)
    return loss if math.isfinite(loss) else math.inf


class PruneOn(Callback):
    """Reports `metric` to the trial after each validation and stops the trial when the pruner says so.

    Not optuna-integration's PyTorchLightningPruningCallback: that reports the monitored value as it is, and
    Optuna's pruners compare intermediate values in the study's direction, so pruning a val/acc study on the
    val/loss signal needs the loss negated. Here it is reported signed to the study's direction (a loss in a
    maximising study as -loss), and the study still selects on its own metric."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        maximize = trial.study.direction == optuna.study.StudyDirection.MAXIMIZE
        self.sign = -1.0 if (metric == TIEBREAK) == maximize else 1.0  # losses fall, the other metrics rise

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        epoch = trainer.current_epoch
        self.trial.report(self.sign * float(value), step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} on {self.metric}")


class EpochProgress(Callback):
    """One line per epoch at most every `every` seconds while a trial trains (a trial can take minutes):
    `trial 3 (4 of 8): epoch 5/12  val/f1_macro 0.9500  best so far 0.9720 (trial 1)`."""

    def __init__(self, label: str, head: str, metric: str, best: str, every: float = 5.0) -> None:
        self.label, self.head, self.metric, self.best, self.every = label, head, metric, best, every
        self._last = time.monotonic()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.monotonic()
        if now - self._last < self.every or not trainer.is_global_zero:
            return
        self._last = now
        value = trainer.callback_metrics.get(self.metric)
        shown = f"{self.metric} {float(value):.4f}" if value is not None else ""
        info(self.label, f"{self.head}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}{self.best}")


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
        inputs: list[SplitInput],
    ) -> None:
        self.cfg, self.root, self.meta, self.train, self.val = cfg, root, meta, train, val
        self.experiment, self.study, self.parent_run_id = experiment, study, parent_run_id
        self.inputs = inputs
        self.current: int | None = None  # number of the trial in progress, for interrupt handling
        self.label = "sweep"  # the progress lines' prefix (`sweep w1` in extra worker processes)

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial.number
        trial.set_user_attr(WORKER_ATTR, this_worker())
        if is_surplus(trial.study, trial.number, self.cfg.sweep.n_trials):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise optuna.TrialPruned(f"trial {trial.number} is past sweep.n_trials (another worker started one too)")
        cfg = with_values(self.cfg, suggest(trial, self.cfg.sweep.space), source=f"trial {trial.number}")
        tags = {
            **run_tags(self.root, "trial", cfg.data.name, combined_digest(self.inputs)),
            "cnnpipe.study": self.study,
            "cnnpipe.trial_number": str(trial.number),
        }
        state = "failed"
        pruned: optuna.TrialPruned | None = None
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
            log_class_balance(run, cfg, self.train, list(self.meta["classes"]))  # a swept setting says what it used
            run.log_inputs(self.inputs, self.root)
            pruning = PruneOn(trial, cfg.sweep.prune_on)
            progress = self._progress(trial)
            try:
                result = fit(
                    cfg,
                    self.meta,
                    self.train,
                    self.val,
                    ckpt_dir=None,
                    sinks=[run.log_metrics],
                    callbacks=[pruning, progress],
                    quiet=True,
                    root=self.root,
                )
                row = best_row(result.history, cfg.sweep.metric, cfg.sweep.direction)
                if row is None:
                    raise TrialFailed(f"{cfg.sweep.metric} was never finite")
                value = row[cfg.sweep.metric]
                trial.set_user_attr(VAL_LOSS_ATTR, _loss(row))
                run.log_metrics({f"best/{cfg.sweep.metric}": value}, step=0)  # a summary: charted as bars
                run.set_tags({"cnnpipe.best_epoch": str(int(row["epoch"]))})
                state = "complete"
                return value
            except optuna.TrialPruned as exc:
                # A result, not a failure: the run ends FINISHED (tag cnnpipe.trial_state=pruned), and Optuna
                # records the trial as PRUNED when the exception reaches it below.
                state, pruned = "pruned", exc
            except KeyboardInterrupt:
                state = "interrupted"
                raise
            finally:
                run.set_tags({"cnnpipe.trial_state": state})
        assert pruned is not None  # every other way out of the block returned or raised
        raise pruned

    def _progress(self, trial: optuna.Trial) -> EpochProgress:
        trials = trial.study.get_trials(deepcopy=False)
        done = sum(1 for t in trials if t.state.is_finished())
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best = ""
        if complete:
            top = trial.study.best_trial
            best = f"  best so far {top.value:.4f} (trial {top.number})"
        head = f"trial {trial.number} ({done + 1} of {self.cfg.sweep.n_trials})"
        return EpochProgress(self.label, head, self.cfg.sweep.metric, best)
