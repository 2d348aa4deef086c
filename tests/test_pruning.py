"""The pruner judges a continuous signal in the study's direction, with its own startup count."""

from __future__ import annotations

import re

import optuna
import pytest

from cnnpipe.training.fit import fit
from cnnpipe.tuning.objective import PruneOn
from cnnpipe.tuning.study import build_pruner
from tests.tiny import tiny_config, tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("direction", "metric", "sign"),
    [
        ("maximize", "val/loss", -1.0),
        ("minimize", "val/loss", 1.0),
        ("maximize", "val/acc", 1.0),
        ("minimize", "val/acc", -1.0),
    ],
)
def test_the_signal_is_reported_in_the_studys_direction(direction: str, metric: str, sign: float) -> None:
    trial = optuna.create_study(direction=direction).ask()
    assert PruneOn(trial, metric).sign == sign


def test_a_val_acc_study_prunes_on_val_loss_after_one_complete_trial() -> None:
    """A maximising study: a complete trial reached val/loss 0.001 (reported as -0.001); a new trial whose loss
    is far worse is pruned at the first epoch after warm-up, and its intermediate values are -val/loss."""
    cfg = tiny_config("train.epochs=4", "sweep.pruner=median", "sweep.n_warmup_epochs=0", "sweep.n_startup_trials=5")
    assert cfg.sweep.pruner_startup_trials == 1 and cfg.sweep.prune_on == "val/loss"
    study = optuna.create_study(direction="maximize", pruner=build_pruner(cfg))
    done = study.ask()
    for epoch in range(4):
        done.report(-0.001, step=epoch)
    study.tell(done, 1.0)
    meta, train, val = tiny_data()
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned, match="epoch 0 on val/loss"):
        fit(cfg, meta, train, val, ckpt_dir=None, callbacks=[PruneOn(trial, "val/loss")], quiet=True)
    reported = study.trials[trial.number].intermediate_values
    assert list(reported) == [0] and reported[0] < -0.001


def test_a_trial_shows_its_progress_with_rounded_values(capsys: pytest.CaptureFixture) -> None:
    """A sweep printed nothing for minutes during a trial: now a line per epoch (at most every few seconds),
    values rounded to 4 decimals, with the best so far."""
    from cnnpipe.tuning.objective import EpochProgress

    meta, train, val = tiny_data()
    progress = EpochProgress("sweep", "trial 3 (4 of 8)", "val/acc", "  best so far 0.9720 (trial 1)", every=0.0)
    fit(tiny_config("train.epochs=2"), meta, train, val, ckpt_dir=None, callbacks=[progress], quiet=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "trial 3" in line]
    assert len(lines) == 2, lines
    assert re.fullmatch(
        r"\[sweep\] trial 3 \(4 of 8\): epoch 2/2  val/acc \d\.\d{4}  best so far 0\.9720 \(trial 1\)", lines[1]
    )
