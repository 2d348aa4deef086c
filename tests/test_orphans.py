"""What a hard kill or a full disk leaves behind, for real: a run left RUNNING by a SIGKILLed training is closed
by the next one, a truncated checkpoint is set aside with one warning line, a damaged models folder is one line
naming the file. Real processes, real signals, a real SQLite store."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnpipe.errors import DataError
from tests.helpers import (
    FAST_TRAIN,
    poll,
    prepared_copy,
    run_stage_process,
    sqlite_store,
    stage_env,
    stage_runs,
    start_stage_process,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_copy(tmp_path_factory.mktemp("orphans"))


def runs_or_none(client: MlflowClient) -> list:
    try:
        return stage_runs(client)
    except Exception:  # the store is being created by the training process
        return []


def kill_hard(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_run_killed_before_its_first_checkpoint_is_closed_by_the_next_run(project: Path) -> None:
    """Issue #11 item 4: SIGKILL after the MLflow run exists, before any checkpoint; the next train closes the
    orphan (KILLED, with the reason as a tag) and removes its checkpoint folder."""
    uri_arg, uri = sqlite_store(project, "orphan")
    client = MlflowClient(uri)
    args = (uri_arg, "paths.checkpoints=ckpt-o", "paths.models=models-o")
    proc = start_stage_process(project, "train", *args, "train.epochs=30")
    ckpt = project / "ckpt-o"
    poll(
        lambda: proc.poll() is not None or (runs_or_none(client) and any(ckpt.glob("*/state.json"))),
        what="the run and its checkpoint folder",
        every=0.05,
    )
    kill_hard(proc)
    (orphan,) = stage_runs(client)
    assert orphan.info.status == "RUNNING"
    folder = ckpt / orphan.info.run_id
    assert not (folder / "lightning" / "last.ckpt").exists(), "killed too late: a checkpoint was written already"

    again = run_stage_process(project, "train", *args, "train.epochs=1")
    assert again.returncode == 0, again.stderr[-3000:]
    closed = client.get_run(orphan.info.run_id)
    assert closed.info.status == "KILLED"
    assert "died" in closed.data.tags["cnnpipe.end_reason"]
    assert closed.data.tags["cnnpipe.owner"] in closed.data.tags["cnnpipe.end_reason"]
    assert [r.info.status for r in stage_runs(client) if r.info.run_id != orphan.info.run_id] == ["FINISHED"]
    warnings = [line for line in again.stderr.splitlines() if orphan.info.run_id in line]
    assert len(warnings) == 1 and "warning" in warnings[0], again.stderr[-3000:]
    assert not folder.exists()  # its orphaned checkpoint state (state.json, no checkpoint) is gone


def test_a_truncated_last_checkpoint_is_set_aside_and_training_resumes_from_the_best_one(project: Path) -> None:
    """Issue #11 item 5: a SIGKILLed training's last.ckpt truncated (what a full disk leaves): the next run says so
    in one line naming the file, sets the file aside, and resumes the same run from best.ckpt."""
    uri_arg, uri = sqlite_store(project, "damaged")
    client = MlflowClient(uri)
    args = (uri_arg, "paths.checkpoints=ckpt-d", "paths.models=models-d", "train.epochs=3")
    proc = start_stage_process(project, "train", *args)
    ckpt = project / "ckpt-d"
    poll(
        lambda: proc.poll() is not None or any(ckpt.glob("*/lightning/last.ckpt")),
        what="the first checkpoint",
        every=0.02,
    )
    kill_hard(proc)
    (killed,) = stage_runs(client)
    last = ckpt / killed.info.run_id / "lightning" / "last.ckpt"
    assert (last.parent / "best.ckpt").is_file()
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])

    again = run_stage_process(project, "train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    warnings = [line for line in again.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(last) in warnings[0], again.stderr[-3000:]
    assert f"resuming MLflow run {killed.info.run_id}" in again.stderr
    (run,) = stage_runs(client)  # the same run, resumed
    assert run.info.status == "FINISHED"
    (aside,) = last.parent.glob("last.ckpt.damaged-*")  # set aside, not deleted, even after the run finished
    assert aside.read_bytes() == data[: len(data) // 2]
    assert json.loads((project / "models-d" / "run.json").read_text())["run_id"] == killed.info.run_id


def test_damaged_last_and_best_checkpoints_start_afresh_and_close_their_run(project: Path) -> None:
    """Issue #11 item 5, no good checkpoint left: both set aside (a warning line each), no resume, and the damaged
    checkpoints' run, still RUNNING, is closed with the reason. In-process, on real files and a real store."""
    from cnnpipe.config import load_config
    from cnnpipe.tracking.runs import close_run, connect
    from cnnpipe.training.resume import Damaged, find_resumable, start_checkpoints

    uri_arg, _ = sqlite_store(project, "damaged-both")
    cfg = load_config([*FAST_TRAIN, uri_arg, "paths.checkpoints=ckpt-b"], root=project)
    client, _ = connect(cfg.tracking.uri, project)
    exp = client.create_experiment("damaged-both")
    run_id = client.create_run(exp).info.run_id  # RUNNING, as a SIGKILLed training leaves it
    ckpt_root = project / "ckpt-b"
    folder = start_checkpoints(cfg, ckpt_root, run_id)
    weights = folder / "lightning"
    weights.mkdir()
    torch.save({"epoch": 1, "state_dict": {"w": torch.zeros(3)}}, weights / "best.ckpt")
    (weights / "last.ckpt").write_bytes((weights / "best.ckpt").read_bytes()[:100])
    (weights / "best.ckpt").write_bytes(b"PK\x03\x04 garbage")

    damaged: list[Damaged] = []
    assert find_resumable(cfg, ckpt_root, damaged=damaged) is None
    assert [(d.run_id, d.checkpoint.name) for d in damaged] == [(run_id, "last.ckpt"), (run_id, "best.ckpt")]
    assert sorted(p.name.split(".damaged-")[0] for p in weights.glob("*.damaged-*")) == ["best.ckpt", "last.ckpt"]
    assert close_run(client, run_id, f"its checkpoint {damaged[0].checkpoint} is damaged")
    assert client.get_run(run_id).info.status == "KILLED"
    assert not close_run(client, run_id, "again")  # only a RUNNING run is closed


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def garbage_models(project: Path, tmp_path: Path) -> Path:
    """A models folder as the train stage writes it (real weights and run.json), about to be damaged."""
    from cnnpipe.config import load_config
    from cnnpipe.models.factory import build_model, model_spec
    from cnnpipe.models.store import save_model

    model = replace(load_config(FAST_TRAIN, root=project).model, channels=[4], hidden=[8])
    spec = model_spec(model, {"image_shape": [1, 8, 8], "classes": ["a", "b"], "mean": [0.4], "std": [0.3]})
    folder = tmp_path / "models"
    save_model(folder, build_model(spec), spec)
    run = {"run_id": "0" * 32, "weights_sha256": sha256(folder / "model.safetensors")}
    (folder / "run.json").write_text(json.dumps(run | {"spec_sha256": sha256(folder / "model.json")}))
    return folder


def test_garbage_weights_or_a_truncated_spec_are_one_line_naming_the_file(garbage_models: Path) -> None:
    """Issue #11 item 6: what load_model (evaluate, predict, init_from) says about a damaged models folder."""
    from cnnpipe.models.store import load_model

    load_model(garbage_models)  # fine as written
    (garbage_models / "run.json").unlink()  # no sha256 to compare: the files themselves must be checked
    weights, spec = garbage_models / "model.safetensors", garbage_models / "model.json"
    good_weights, good_spec = weights.read_bytes(), spec.read_text()
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match=str(weights)) as bad:
        load_model(garbage_models)
    assert "\n" not in str(bad.value)
    weights.write_bytes(good_weights)
    spec.write_text(good_spec[: len(good_spec) // 2])
    with pytest.raises(DataError, match=str(spec)) as bad:
        load_model(garbage_models)
    assert "\n" not in str(bad.value)


def test_weights_that_do_not_match_run_json_are_refused(garbage_models: Path) -> None:
    """models/ pairing one run's id with other weights (hand edits, a half copy): refused, naming the file."""
    from cnnpipe.models.store import load_published, save_model

    net, spec, run = load_published(garbage_models)
    torch.nn.init.constant_(next(net.parameters()), 0.5)
    save_model(garbage_models, net, spec)  # other weights, the old run.json
    with pytest.raises(DataError, match=rf"model\.safetensors: does not belong to run {run['run_id']}"):
        load_published(garbage_models)


def test_predict_and_evaluate_with_garbage_weights_exit_2_with_one_line(project: Path, garbage_models: Path) -> None:
    models = project / "models-garbage"  # inside the project: evaluate writes only there
    shutil.copytree(garbage_models, models)
    (models / "model.safetensors").write_bytes(b"not safetensors")
    for cmd in (
        ["pipelines/predict.py", str(project / "data" / "prepared"), "--model", str(models)],
        ["pipelines/evaluate.py", "paths.models=models-garbage", "paths.eval=eval-garbage"],
    ):
        proc = subprocess.run(
            [sys.executable, *cmd],
            cwd=project,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert lines[-1].endswith("re-run `dvc repro train`") and str(models / "model.safetensors") in lines[-1]
