"""What you set is what runs: a key the user set wins over the sweep (train) or is pinned (sweep), a tuned key's
base value is not part of the study's identity, the sweep's best trial breaks ties by val/loss, and a sweep
does nothing when train will not use it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cnnpipe.config import compose, explicit_keys, load_config
from cnnpipe.errors import ConfigError
from cnnpipe.stages.sweep import best_trial, pin_explicit
from cnnpipe.stages.train import apply_hparams
from cnnpipe.tuning.objective import VAL_LOSS_ATTR, best_row
from cnnpipe.tuning.study import study_name
from tests.helpers import ROOT, prepared_copy, stage_env


@pytest.fixture(scope="module")
def conf_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conf/ and params.yaml only: explicit_keys reads nothing else."""
    root = tmp_path_factory.mktemp("conf")
    subprocess.run(["cp", "-r", str(ROOT / "conf"), str(root / "conf")], check=True)
    return root


def params_from(root: Path, *overrides: str) -> Path:
    """params.yaml as `dvc exp run -S ...` writes it: conf/ composed with these overrides."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(compose(list(overrides), conf_dir=root / "conf"), sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("dvc_sets", "cli", "expected"),
    [
        ([], [], set()),
        (["optim.lr=0.01"], [], {"optim.lr"}),
        (["optim=sgd"], [], set()),  # a group choice sets no key: its values are conf/'s
        (["optim=sgd", "optim.lr=0.01"], [], {"optim.lr"}),
        (["model=cnn_bn", "trainer=ddp"], [], set()),
        (["trainer=ddp", "trainer.devices=3"], [], {"trainer.devices"}),
        ([], ["optim.lr=0.003", "train.epochs=10", "model=cnn_bn"], {"optim.lr", "train.epochs"}),
    ],
)
def test_explicit_keys_are_what_the_user_set(
    conf_copy: Path, dvc_sets: list[str], cli: list[str], expected: set[str]
) -> None:
    params = params_from(conf_copy, *dvc_sets)
    assert explicit_keys(cli, conf_copy, params) == expected


def sweep_result(root: Path, params: dict) -> None:
    (root / "sweep").mkdir(exist_ok=True)
    (root / "sweep" / "best_params.yaml").write_text(yaml.safe_dump({"best_trial": 3, "params": params}))


def test_a_key_the_user_set_wins_over_the_sweep_and_is_tagged(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(["optim.lr=0.01", "train.epochs=10"], root=ROOT)
    sweep_result(tmp_path, {"optim.lr": 0.0042, "train.epochs": 17, "data.batch_size": 32})
    used, tags = apply_hparams(cfg, tmp_path, frozenset({"optim.lr", "train.epochs"}))
    assert (used.optim.lr, used.train.epochs, used.data.batch_size) == (0.01, 10, 32)
    assert tags["cnnpipe.hparams_set_by_user"] == "optim.lr, train.epochs"
    err = capsys.readouterr().err
    assert "set by you, so used instead of the sweep's: optim.lr=0.01 (sweep's best 0.0042)" in err


def test_without_explicit_keys_the_sweep_values_are_used(tmp_path: Path) -> None:
    sweep_result(tmp_path, {"optim.lr": 0.0042})
    used, tags = apply_hparams(load_config([], root=ROOT), tmp_path)
    assert used.optim.lr == 0.0042 and "cnnpipe.hparams_set_by_user" not in tags


def test_a_sweep_result_naming_an_unknown_model_is_refused_before_training(tmp_path: Path) -> None:
    """The sweep's values are validated as a user's are: model.name against the names conf/model declares."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    sweep_result(tmp_path, {"model.name": "vgg99"})
    with pytest.raises(ConfigError, match=r"model.name must be one of .*cnn.*, got 'vgg99'"):
        apply_hparams(load_config([], root=ROOT), tmp_path)


def test_a_tuned_keys_base_value_is_not_part_of_the_study_identity() -> None:
    base = load_config([], root=ROOT)
    assert study_name(load_config(["optim.lr=0.01"], root=ROOT)) == study_name(base)
    assert study_name(load_config(["train.hparams=params"], root=ROOT)) == study_name(base)
    assert study_name(load_config(["optim.weight_decay=0.1"], root=ROOT)) != study_name(base)  # not tuned


def test_a_tuned_key_the_user_set_is_pinned_into_a_study_of_its_own() -> None:
    cfg = load_config(["optim.lr=0.01"], root=ROOT)
    pinned = pin_explicit(cfg, frozenset({"optim.lr"}))
    assert "optim.lr" not in {p.key for p in pinned.sweep.space.values()}
    assert {p.key for p in pinned.sweep.space.values()} == {"data.batch_size", "train.epochs"}
    assert study_name(pinned) != study_name(cfg)  # the pinned value now shapes every trial
    other = pin_explicit(load_config(["optim.lr=0.02"], root=ROOT), frozenset({"optim.lr"}))
    assert study_name(other) != study_name(pinned)
    with pytest.raises(ConfigError, match="every key it tunes is set by you"):
        pin_explicit(cfg, frozenset({"optim.lr", "data.batch_size", "train.epochs"}))


def test_the_best_epoch_and_the_best_trial_break_ties_by_val_loss(capsys: pytest.CaptureFixture) -> None:
    rows = [{"val/acc": 0.9, "val/loss": 0.5}, {"val/acc": 1.0, "val/loss": 0.3}, {"val/acc": 1.0, "val/loss": 0.1}]
    assert best_row(rows, "val/acc", "maximize") is rows[2]
    assert best_row([{"val/acc": math.nan}], "val/acc", "maximize") is None
    # float32 noise is a tie too: a perfect accuracy comes out as 1.0000001 in one run, 1.0 in another
    noisy = [{"val/acc": 1.0000001192092896, "val/loss": 0.3}, {"val/acc": 1.0, "val/loss": 0.1}]
    assert best_row(noisy, "val/acc", "maximize") is noisy[1]
    cfg = load_config([], root=ROOT)
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for value, loss, x in ((1.0, 0.4, 0.1), (1.0, 0.2, 0.2), (0.9, 0.01, 0.3)):
        study.add_trial(
            optuna.trial.create_trial(
                value=value, params={"x": x}, distributions=dist, user_attrs={VAL_LOSS_ATTR: loss}
            )
        )
    assert study.best_trial.number == 0 and best_trial(study, cfg).number == 1
    assert "tie" not in capsys.readouterr().err
    tied = optuna.create_study(direction="maximize")
    for loss, x in ((0.4, 0.1), (0.2, 0.2)):
        tied.add_trial(
            optuna.trial.create_trial(value=1.0, params={"x": x}, distributions=dist, user_attrs={VAL_LOSS_ATTR: loss})
        )
    assert best_trial(tied, cfg).number == 1
    noisy = optuna.create_study(direction="maximize")
    for value, loss, x in ((1.0000001192092896, 0.4, 0.1), (1.0, 0.2, 0.2)):
        noisy.add_trial(
            optuna.trial.create_trial(
                value=value, params={"x": x}, distributions=dist, user_attrs={VAL_LOSS_ATTR: loss}
            )
        )
    assert best_trial(noisy, cfg).number == 1
    assert "all 2 complete trials tie on val/f1_macro = 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_copy(tmp_path_factory.mktemp("explicit"))


def stage(project: Path, name: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"pipelines/{name}.py", "augment=none", "trainer.threads=1", *overrides],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_readme_example_trains_with_the_values_given_on_the_command_line(project: Path) -> None:
    """`python pipelines/train.py optim.lr=0.01 train.epochs=10` with a sweep result present (hparams: sweep):
    the run trains 2 epochs at lr 0.01, logs those values, and takes only batch_size from the sweep."""
    sweep_result(project, {"optim.lr": 0.0042, "train.epochs": 3, "data.batch_size": 32})
    store = f"sqlite:///{project / 'explicit.db'}"
    proc = stage(project, "train", "optim.lr=0.01", "train.epochs=2", f"tracking.uri={store}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "set by you, so used instead of the sweep's: optim.lr=0.01" in proc.stderr
    run_id = json.loads((project / "models" / "run.json").read_text())["run_id"]
    run = MlflowClient(store).get_run(run_id)
    assert (run.data.params["optim.lr"], run.data.params["train.epochs"]) == ("0.01", "2")
    assert run.data.params["data.batch_size"] == "32"
    assert len((project / "models" / "history.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.slow
def test_no_sweep_runs_when_train_will_not_use_it(project: Path) -> None:
    store = f"sqlite:///{project / 'skip.db'}"
    proc = stage(project, "sweep", "train.hparams=params", f"tracking.uri={store}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no sweep was run" in proc.stderr
    best = yaml.safe_load((project / "sweep" / "best_params.yaml").read_text())
    assert best["params"] == {} and "train.hparams=params" in best["skipped"]
    assert MlflowClient(store).search_experiments(filter_string="name = 'cnnpipe-digits'") == []


def test_the_best_checkpoint_takes_a_float32_tie_to_the_lower_val_loss(tmp_path: Path) -> None:
    """BestCheckpoint's decision on a real Trainer: 1.0000001 after 1.0 is no improvement unless its loss is lower."""
    import lightning.pytorch as pl
    import torch

    from cnnpipe.training.trainer import BestCheckpoint

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    ckpt = BestCheckpoint(dirpath=tmp_path, filename="best", monitor="val/acc", mode="max")
    ckpt.best_k_models = {str(tmp_path / "best.ckpt"): torch.tensor(1.0)}
    ckpt.kth_best_model_path = str(tmp_path / "best.ckpt")
    ckpt.best_tiebreak = 0.2
    trainer.callback_metrics["val/loss"] = torch.tensor(0.3)
    assert not ckpt.check_monitor_top_k(trainer, torch.tensor(1.0000001192092896))  # noise, higher loss: kept
    trainer.callback_metrics["val/loss"] = torch.tensor(0.1)
    assert ckpt.check_monitor_top_k(trainer, torch.tensor(1.0))  # a tie with a lower loss: replaces it
    trainer.callback_metrics["val/loss"] = torch.tensor(0.5)
    assert ckpt.check_monitor_top_k(trainer, torch.tensor(1.01))  # a real improvement wins whatever its loss
