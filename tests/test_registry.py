"""The model registry, for real: `dvc repro` registers the evaluated model; a second model moves `champion`
only when its test metric beats the champion's (as stored in the version tags)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnpipe.tracking.registry import register_run_model
from tests.helpers import MODEL, eval_metrics, stage, store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(trained_project: Path) -> Path:
    return trained_project


def test_repro_registers_the_train_runs_model_as_candidate_and_champion(project: Path) -> None:
    client = store(project)
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    registered = client.get_registered_model(MODEL)
    assert {alias: str(v) for alias, v in registered.aliases.items()} == {"candidate": "1", "champion": "1"}
    version = client.get_model_version(MODEL, "1")
    assert version.run_id == run_id
    # The version is the model the train run logged (a pyfunc over the safetensors weights).
    exp_id = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models(experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}'")
    assert [f"models:/{m.model_id}" for m in logged] == [version.source]
    # Its test metrics travel with it as tags: equal to eval/metrics.json, no need for the run to compare.
    metrics = eval_metrics(project)
    assert {k: float(version.tags[f"test/{k}"]) for k in metrics} == pytest.approx(metrics)
    assert version.tags["cnnpipe.run_id"] == run_id


def test_champion_moves_only_when_the_new_models_metric_beats_it(project: Path) -> None:
    name = "cnnpipe-digits-champion-test"  # its own registered model: cnnpipe-digits@champion stays as it is
    reg = f"tracking.registered_model={name}"
    client = store(project)

    # The pipeline's model first: no champion yet, so it becomes one.
    out = stage(project, "evaluate", reg, "paths.eval=eval_a")
    assert f"registered {name} version 1 as candidate and champion: there was no champion" in out

    # A second, different model (1 epoch), evaluated: candidate always, champion only if its test metric
    # (tracking.champion_metric, macro F1 by default) is higher.
    stage(project, "train", "train.hparams=params", "train.epochs=1", "paths.models=models_b", "paths.checkpoints=ck_b")
    out = stage(project, "evaluate", reg, "paths.models=models_b", "paths.eval=eval_b")
    acc_a, acc_b = eval_metrics(project, "eval_a")["f1_macro"], eval_metrics(project, "eval_b")["f1_macro"]
    v1, v2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    assert float(v1.tags["test/f1_macro"]) == pytest.approx(acc_a)
    assert float(v2.tags["test/f1_macro"]) == pytest.approx(acc_b)
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    assert aliases["candidate"] == "2"
    assert aliases["champion"] == ("2" if acc_b > acc_a else "1")
    verb = "beats" if acc_b > acc_a else "does not beat"
    assert f"test/f1_macro {acc_b:.4f} {verb} champion v1's {acc_a:.4f}" in out

    # The same run evaluated again, now ranking by the lower score: the version is updated, not duplicated, and
    # champion ends on v2 either way (it already was, or its accuracy is the lower one), unless it is a tie.
    stage(project, "evaluate", reg, "paths.models=models_b", "paths.eval=eval_b", "tracking.champion_mode=min")
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"candidate": "2", "champion": "1" if acc_b == acc_a else "2"}
    # cnnpipe-digits was not touched.
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"


def test_a_run_without_a_logged_model_registers_nothing(project: Path) -> None:
    client = store(project)
    exp = client.get_experiment_by_name("cnnpipe-digits")
    trial = client.search_runs([exp.experiment_id], filter_string="tags.`cnnpipe.stage` = 'trial'")[0]
    metrics = eval_metrics(project)
    assert register_run_model(None, project, trial.info.run_id, "cnnpipe-none", metrics, "acc", "max") is None
    assert client.search_registered_models(filter_string="name = 'cnnpipe-none'") == []
