"""The pruner judges a continuous signal in the study's direction, with its own startup count."""

from __future__ import annotations

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
