"""Transfer learning: weights from an earlier model (folder, checkpoint, or MLflow) into a new head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnpipe.config import load_config
from cnnpipe.errors import ConfigError
from cnnpipe.models.factory import build_model, model_spec
from cnnpipe.models.store import save_model
from cnnpipe.models.transfer import backbone_modules, transfer_weights
from cnnpipe.training.fit import fit
from tests.helpers import stage, store
from tests.tiny import tiny_data

ROOT = Path(__file__).resolve().parents[1]


def cfg_with(*overrides: str):
    return load_config(
        ["train.hparams=params", "trainer.accelerator=cpu", "data.batch_size=16", "optim.lr=0.01", *overrides],
        root=ROOT,
    )


def fit_tiny(cfg, ckpt_dir: Path | None = None):
    """`fit` on the tiny 3-class data of test_fit, quietly."""
    meta, train, val = tiny_data()
    return fit(cfg, meta, train, val, ckpt_dir=ckpt_dir, quiet=True, root=ROOT)


def spec_for(classes: list[str]) -> dict:
    meta = {"image_shape": [1, 8, 8], "classes": classes, "mean": [0.1], "std": [0.2]}
    return model_spec(cfg_with().model, meta)


def test_backbone_is_copied_head_and_normalisation_are_not() -> None:
    torch.manual_seed(0)
    source = build_model(spec_for([str(i) for i in range(10)]))
    target = build_model({**spec_for(["a", "b", "c"]), "mean": [0.5], "std": [0.5]})
    report = transfer_weights(target, source.state_dict())
    for key, value in target.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert "head.3.weight" in report.skipped or any(k.startswith("head.") for k in report.skipped)
    assert target.state_dict()["normalize.mean"].item() == pytest.approx(0.5)  # the new data's statistics
    assert target.head[-1].out_features == 3


def test_init_from_a_models_folder_and_freeze_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model(spec_for(["x", "y", "z", "w"]))
    save_model(tmp_path / "source", source, spec_for(["x", "y", "z", "w"]))
    cfg = cfg_with("train.epochs=3", f"model.init_from={tmp_path / 'source'}", "model.freeze_epochs=2")
    result = fit_tiny(cfg)
    # Frozen for epochs 1-2, then trained: the conv weights moved only after unfreezing, away from the source.
    first_conv = next(k for k in result.net.state_dict() if k.startswith("features.") and k.endswith("weight"))
    assert not torch.equal(result.net.state_dict()[first_conv], source.state_dict()[first_conv])
    assert all(p.requires_grad for m in backbone_modules(result.net) for p in m.parameters())
    assert result.history[-1]["val/acc"] > 0.6


def test_frozen_backbone_stays_identical_while_frozen(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = build_model(spec_for(["p", "q", "r"]))
    save_model(tmp_path / "source", source, spec_for(["p", "q", "r"]))
    cfg = cfg_with("train.epochs=2", f"model.init_from={tmp_path / 'source'}", "model.freeze_epochs=5")
    result = fit_tiny(cfg)
    for key, value in result.net.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(value, source.state_dict()[key]), key


def test_init_from_a_lightning_checkpoint(tmp_path: Path) -> None:
    first = fit_tiny(cfg_with("train.epochs=1"), ckpt_dir=tmp_path / "ckpt")
    cfg = cfg_with("train.epochs=1", f"model.init_from={tmp_path / 'ckpt' / 'last.ckpt'}", "model.freeze_epochs=1")
    second = fit_tiny(cfg)
    key = next(k for k in first.net.state_dict() if k.startswith("features."))
    assert torch.equal(second.net.state_dict()[key], first.net.state_dict()[key])  # frozen: still the source's


def test_an_architecture_that_does_not_fit_is_one_clear_error(tmp_path: Path) -> None:
    other = load_config(["model=resnet_small"], root=ROOT).model
    meta = {"image_shape": [1, 8, 8], "classes": ["a", "b"], "mean": [0.1], "std": [0.2]}
    save_model(tmp_path / "resnet", build_model(model_spec(other, meta)), model_spec(other, meta))
    with pytest.raises(ConfigError, match="no backbone weight fits"):
        fit_tiny(cfg_with("train.epochs=1", f"model.init_from={tmp_path / 'resnet'}"))


def test_init_from_must_name_something_loadable() -> None:
    with pytest.raises(ConfigError, match=r"model\.init_from"):
        fit_tiny(cfg_with("train.epochs=1", "model.init_from=nowhere"))


def test_freeze_epochs_needs_init_from() -> None:
    with pytest.raises(ConfigError, match=r"model\.freeze_epochs"):
        cfg_with("model.freeze_epochs=2")


@pytest.mark.slow
def test_fine_tune_the_registered_champion_through_the_train_stage(trained_project: Path) -> None:
    project = trained_project
    err = stage(
        project,
        "train",
        "train.hparams=params",
        "train.epochs=2",
        "model.freeze_epochs=1",
        "model.init_from=models:/cnnpipe-digits@champion",
        "paths.models=models-finetuned",
        "tracking.log_model=false",
    )
    assert "initialised" in err and "from models:/cnnpipe-digits@champion" in err
    assert "epoch 2: backbone unfrozen" in err
    client = store(project)
    exp = client.get_experiment_by_name("cnnpipe-digits")
    (run,) = client.search_runs([exp.experiment_id], filter_string="params.`model.freeze_epochs` = '1'")
    assert run.data.params["model.init_from"] == "models:/cnnpipe-digits@champion"
    # Starting from a trained digits model, one frozen epoch already classifies well.
    assert client.get_metric_history(run.info.run_id, "val/acc")[0].value > 0.8
