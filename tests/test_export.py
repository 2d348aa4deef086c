"""`pipelines/export.py`: a model as ONNX for apps, checked against PyTorch, written whole or not at all, logged to
its train run. Fast: models folders (a tiny cnnpipe CNN, timm's test ResNet) with --images; slow: the digits
champion end to end, and every MLflow reference kind."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnpipe.data.images import decode_image
from cnnpipe.data.store import load_split
from cnnpipe.errors import CnnpipeError, DataError
from cnnpipe.models.factory import build_model
from cnnpipe.models.predictor import PROB_PREFIX, ImagePredictor
from cnnpipe.models.store import file_sha256, save_model
from cnnpipe.serving import export as export_module
from cnnpipe.serving.export import ExportCheckError, run_export
from cnnpipe.tracking.model_files import download_model_files
from tests.helpers import copy_project, png_bytes, stage_env, tiny_model, write_png
from tests.tiny import conf_section

TOLERANCE = 1e-4  # the documented default (export.DEFAULT_TOLERANCE), restated: a change to it must be deliberate


def image_folder(root: Path, seed: int = 0) -> Path:
    """Image files of every kind an app may hold: grey and RGB PNGs of other sizes and shapes, RGBA, a JPEG, a
    16-bit PNG, and one broken file."""
    rng = np.random.default_rng(seed)
    write_png(root / "grey.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    write_png(root / "wide.png", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    write_png(root / "tall.png", rng.integers(0, 256, (50, 30, 3), dtype=np.uint8))
    write_png(root / "alpha.png", rng.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    write_png(root / "deep.png", rng.integers(0, 65536, (10, 10), dtype=np.uint16))
    (root / "photo.jpg").write_bytes(png_bytes(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "JPEG"))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and nothing after")
    return root


GOOD_FILES = ["alpha.png", "deep.png", "grey.png", "photo.jpg", "tall.png", "wide.png"]


def session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def app_probabilities(onnx_file: Path, record: dict[str, Any], folder: Path, names: list[str]) -> np.ndarray:
    """What an app does with the export: each file decoded as preprocessing.json says (prepare's decoder does
    those steps), one uint8 batch, the graph's probabilities."""
    pre = record["preprocessing"]
    decoded = [
        decode_image(folder / n, pre["channels"], pre["size"][0], pre["interpolation"], pre["central_square"])
        for n in names
    ]
    return session(onnx_file).run([record["outputs"][0]["name"]], {record["input"]["name"]: np.stack(decoded)})[0]


def predictor_probabilities(models: Path, folder: Path, names: list[str]) -> np.ndarray:
    """What predict.py answers for the same files (the bytes path, as the MLflow server gets them)."""
    frame = ImagePredictor.from_folder(models).predict([(folder / n).read_bytes() for n in names])
    assert frame["error"].isna().all()
    return frame[[c for c in frame.columns if c.startswith(PROB_PREFIX)]].to_numpy(dtype=np.float64)


def test_a_models_folder_exports_to_onnx_that_answers_as_predict_does(tmp_path: Path, one_thread: None) -> None:
    models = tiny_model(tmp_path / "models")
    images = image_folder(tmp_path / "images")
    out = tmp_path / "exports" / "tiny"
    report = run_export(str(models), out, images, root=None)

    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "preprocessing.json"]
    assert [p.name for p in out.parent.iterdir()] == ["tiny"], "no temporary folder is left beside it"
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["input"] == {
        "name": "images",
        "dtype": "uint8",
        "shape": ["batch", 1, 8, 8],
        "layout": "NCHW",
        "range": [0, 255],
    }
    assert [(o["name"], o["dtype"], o["shape"]) for o in record["outputs"]] == [
        ("probabilities", "float32", ["batch", 3]),
        ("logits", "float32", ["batch", 3]),
    ]
    assert record["classes"] == ["cat", "dog", "eel"] and record["opset"] == 18
    pre = record["preprocessing"]
    assert (pre["channels"], pre["size"], pre["interpolation"], pre["central_square"]) == (1, [8, 8], "bilinear", True)
    assert any("central square" in step for step in pre["steps"]) and "x / 255" in record["in_the_graph"]
    assert record["source"] == {
        "reference": str(models),
        "registered_model": None,
        "version": None,
        "run_id": None,
        "model_id": None,
    }
    check = record["check"]
    assert check["ok"] and check["images"] == 6 and check["images_skipped"] == 1
    assert check["images_from"] == str(images) and check["tolerance"] == TOLERANCE
    assert check["max_abs_diff_probabilities"] <= TOLERANCE and check["top1_agreement"] == 1.0
    assert report.logged_run is None and report.check.images == 6

    # An app following preprocessing.json gets what predict.py answers for the same files.
    onnx_file = out / "model.onnx"
    got = app_probabilities(onnx_file, record, images, GOOD_FILES)
    expected = predictor_probabilities(models, images, GOOD_FILES)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    # The batch axis is free: one image at a time, three, all six: the same rows; softmax(logits) = probabilities.
    batch = np.stack([decode_image(images / n, 1, 8) for n in GOOD_FILES])
    run = session(onnx_file)
    rows = np.concatenate([run.run(["probabilities"], {"images": batch[i : i + 1]})[0] for i in range(6)])
    np.testing.assert_allclose(run.run(["probabilities"], {"images": batch[:3]})[0], rows[:3], atol=1e-6, rtol=0)
    probabilities, logits = run.run(["probabilities", "logits"], {"images": batch})
    np.testing.assert_allclose(probabilities, rows, atol=1e-6, rtol=0)
    np.testing.assert_allclose(torch.from_numpy(logits).softmax(dim=1).numpy(), probabilities, atol=1e-6, rtol=0)


def test_the_resnet_family_exports_too(tmp_path: Path, one_thread: None) -> None:
    """cnnpipe's other family (residual blocks, batch norm) through the same export and check."""
    spec = {
        "model": asdict(conf_section("model", name="resnet_small", channels=[4, 8], convs_per_block=1, hidden=[])),
        "in_shape": [1, 10, 10],
        "classes": ["a", "b", "c"],
        "mean": [0.4],
        "std": [0.3],
        "input_size": 8,
        "interpolation": "bilinear",
        "crop_pct": 0.8,
    }
    torch.manual_seed(0)
    net = build_model(spec).eval()
    images = np.random.default_rng(0).integers(0, 256, (20, 1, 10, 10), dtype=np.uint8)
    export_module.export_onnx(net, tmp_path / "model.onnx", images)
    check = export_module.compare(tmp_path / "model.onnx", net, images)
    assert check.ok and check.images == 20 and check.batch_rows == 8, check
    probabilities = session(tmp_path / "model.onnx").run(["probabilities"], {"images": images[:5]})[0]
    expected = ImagePredictor(net, spec).probabilities(images[:5])
    np.testing.assert_allclose(probabilities, expected, atol=TOLERANCE, rtol=0)


def timm_model(folder: Path, arch: str) -> Path:
    """An untrained timm network for RGB images stored at 36 px, taking the central 32 (crop_pct 32/36), saved as
    the train stage saves models/; its classifier weights scaled up so that the probabilities differ between
    images."""
    spec = {
        "model": asdict(conf_section("model", name="timm", arch=arch)),
        "in_shape": [3, 36, 36],
        "classes": ["red", "green", "blue"],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "input_size": 32,
        "interpolation": "bicubic",
        "crop_pct": 32 / 36,
    }
    torch.manual_seed(0)
    net = build_model(spec)
    with torch.no_grad():
        for head in net.head_modules():
            head.weight.mul_(20.0)
    save_model(folder, net, spec)
    return folder


@pytest.mark.parametrize("arch", ["test_resnet", pytest.param("test_vit", marks=pytest.mark.slow)])
def test_timm_networks_export_with_their_crop_inside(arch: str, tmp_path: Path, one_thread: None) -> None:
    models = timm_model(tmp_path / "models", arch)
    images = image_folder(tmp_path / "images")
    out = tmp_path / "export"
    report = run_export(str(models), out, images, root=None)
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["input"]["shape"] == ["batch", 3, 36, 36]
    assert record["preprocessing"]["interpolation"] == "bicubic"
    assert "centre crop to 32 px (when smaller than the input)" in record["in_the_graph"]
    assert record["check"]["ok"] and report.check.max_abs_diff_probabilities <= TOLERANCE
    got = app_probabilities(out / "model.onnx", record, images, GOOD_FILES)
    expected = predictor_probabilities(models, images, GOOD_FILES)
    assert np.ptp(expected, axis=0).max() > 0.05, "the images get different answers: the check compares something"
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_an_export_that_fails_its_check_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """A graph that answers otherwise than the model (here: written from a network with one weight changed) is
    refused in one line; the previous export stays as it was and no temporary folder is left."""
    models = tiny_model(tmp_path / "models")
    images = image_folder(tmp_path / "images")
    out = tmp_path / "exports" / "tiny"
    run_export(str(models), out, images, root=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_export = export_module.export_onnx

    def tampered(net: torch.nn.Module, path: Path, example: np.ndarray, metadata: dict[str, str]) -> float:
        other = copy.deepcopy(net)
        with torch.no_grad():
            other.head[-1].bias.add_(torch.tensor([0.5, 0.0, 0.0]))
        return real_export(other, path, example, metadata)

    monkeypatch.setattr(export_module, "export_onnx", tampered)
    for target in (out, tmp_path / "exports" / "new"):
        with pytest.raises(ExportCheckError) as err:
            run_export(str(models), target, images, root=None)
        message = str(err.value)
        assert "onnxruntime disagrees with PyTorch on 6 image(s)" in message and "\n" not in message
        assert f"nothing written to {target}" in message
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]


def test_a_models_folder_whose_run_is_not_in_the_store_is_exported_unlogged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    """models/run.json names the train run to log to; a project with no store gets a warning, not an empty store."""
    project = copy_project(tmp_path / "project")
    models = tiny_model(project / "models")
    (models / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    report = run_export(str(models), None, image_folder(tmp_path / "images"), root=project)
    assert report.out == project / "export" / "models" and (report.out / "model.onnx").is_file()
    assert report.logged_run is None and not (project / "mlflow.db").exists()
    record = json.loads((report.out / "preprocessing.json").read_text())
    assert record["source"]["run_id"] == "0" * 32
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"[export] warning: not logged to MLflow: run {'0' * 32}: no MLflow store at sqlite:///{project / 'mlflow.db'}"
    ]


def test_bad_references_and_inputs_are_one_line_user_errors(tmp_path: Path) -> None:
    models = tiny_model(tmp_path / "models")
    images = image_folder(tmp_path / "images")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"no-such: not a models folder, a run id or a models:/ or runs:/ URI$"):
        run_export(str(tmp_path / "no-such"), out, images, root=None)
    with pytest.raises(DataError, match=r"nowhere: not a folder \(--images\)$"):
        run_export(str(models), out, tmp_path / "nowhere", root=None)
    with pytest.raises(DataError, match=r"no images to check the export on: .* give --images$"):
        run_export(str(models), out, None, root=None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken: none of its 1 image file\(s\) could be decoded"):
        run_export(str(models), out, broken, root=None)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"file: is a file; --out names the folder to write$"):
        run_export(str(models), tmp_path / "file", images, root=None)
    # A tracking store that is not there is said so, and not created empty (as MLflow would).
    store = tmp_path / "none.db"
    with pytest.raises(CnnpipeError, match=rf"^models:/m@champion: no MLflow store at sqlite:///{store}"):
        download_model_files("models:/m@champion", f"sqlite:///{store}", tmp_path, tmp_path / "dl")
    assert not store.exists() and not out.exists()


# ---------------------------------------------------------------- the pipeline's champion: slow


def cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "pipelines/export.py", *args],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_every_mlflow_reference_names_the_same_model_and_run(trained_project: Path, tmp_path: Path) -> None:
    run_id = json.loads((trained_project / "models/run.json").read_text())["run_id"]
    uri = f"sqlite:///{trained_project / 'mlflow.db'}"
    expected = {"run_id": run_id, "weights": file_sha256(trained_project / "models/model.safetensors")}
    references = {
        "models:/cnnpipe-digits@champion": ("cnnpipe-digits", "1"),
        "models:/cnnpipe-digits/1": ("cnnpipe-digits", "1"),
        run_id: (None, None),
        f"runs:/{run_id}/model": (None, None),
    }
    for i, (reference, registered) in enumerate(references.items()):
        files = download_model_files(reference, uri, trained_project, tmp_path / str(i))
        assert (files.name, files.version) == registered, reference
        found = {"run_id": files.run_id, "weights": file_sha256(files.folder / "model.safetensors")}
        assert found == expected, reference
    with pytest.raises(CnnpipeError, match=r"^models:/cnnpipe-nothing@champion: cannot load the model from sqlite:"):
        download_model_files("models:/cnnpipe-nothing@champion", uri, trained_project, tmp_path / "none")


@pytest.mark.slow
def test_the_champion_exports_end_to_end_and_is_logged_to_its_run(
    fresh_trained_project: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    project = fresh_trained_project
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    proc = cli(project)
    assert proc.returncode == 0, proc.stderr
    out = project / "export" / "cnnpipe-digits-v1"
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(
        f"[export] models:/cnnpipe-digits@champion (cnnpipe-digits v1, run {run_id}) -> export/cnnpipe-digits-v1/"
        "model.onnx ("
    ), lines
    assert lines[1].startswith("[export] onnxruntime vs PyTorch on ") and "top-1 agreement 100.00%" in lines[1]
    assert lines[2:] == [f"[export] logged onnx/model.onnx and onnx/preprocessing.json to run {run_id}"]

    test = load_split(project / "data/prepared/test.npz")
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["source"]["registered_model"] == "cnnpipe-digits" and record["source"]["version"] == "1"
    assert record["source"]["run_id"] == run_id and record["check"]["images"] == len(test.labels)
    assert record["check"]["images_from"] == "data/prepared/test.npz" and record["check"]["ok"]
    assert record["classes"] == [str(d) for d in range(10)]
    # The graph on the test split: the classes predict.py gives the same pixels.
    probabilities = session(out / "model.onnx").run(["probabilities"], {"images": test.images})[0]
    expected = ImagePredictor.from_folder(project / "models").predict(test.images)
    assert [str(c) for c in probabilities.argmax(axis=1)] == expected["class"].tolist()

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert sorted(a.path for a in client.list_artifacts(run_id, "onnx")) == [
        "onnx/model.onnx",
        "onnx/preprocessing.json",
    ]
    logged = Path(client.download_artifacts(run_id, "onnx/model.onnx", str(project / "downloaded")))
    assert logged.read_bytes() == (out / "model.onnx").read_bytes()
    tags = client.get_run(run_id).data.tags
    assert float(tags["cnnpipe.onnx_max_abs_diff"]) == pytest.approx(
        record["check"]["max_abs_diff_probabilities"], rel=1e-3
    )
    assert float(tags["cnnpipe.onnx_max_abs_diff"]) <= TOLERANCE and tags["cnnpipe.onnx_images"] == str(
        len(test.labels)
    )

    # The models folder the pipeline wrote: its run.json names the same run, logged to again.
    report = run_export(str(project / "models"), None, None, root=project)
    assert report.out == project / "export" / "models" and report.logged_run == run_id
    assert json.loads((report.out / "preprocessing.json").read_text())["check"]["images"] == len(test.labels)

    missing = cli(project, "--model", "models:/cnnpipe-nothing@champion", "--out", str(project / "never"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"cnnpipe export: error: models:/cnnpipe-nothing@champion: cannot load the model from sqlite:///"
        f"{project / 'mlflow.db'}: Registered Model with name=cnnpipe-nothing not found"
    ]
    assert not (project / "never").exists()
