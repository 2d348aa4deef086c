"""`pipelines/predict.py`: a folder of images -> predictions.csv, from a models folder, a run id or the registry."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnpipe.data.images import decode_image
from cnnpipe.data.store import load_split
from cnnpipe.errors import CnnpipeError
from cnnpipe.models.predictor import ImagePredictor
from cnnpipe.serving.predict import run_predict
from tests.helpers import ROOT, copy_project, png_bytes, stage_env, tiny_model, write_png


def cli(*args: str, project: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`python pipelines/predict.py ...` of `project` (the script finds its project's params.yaml and store); no
    prediction log unless the test asks for one (by default it would go to the project's monitor/: the repo's)."""
    logging = any(a in ("--log", "--no-log", "--log-images") for a in args)
    return subprocess.run(
        [sys.executable, "pipelines/predict.py", *args, *([] if logging else ["--no-log"])],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Images in sub-folders (PNG, JPEG, RGB, big), two broken ones, and files that are no images at all."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    write_png(root / "a" / "one.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    write_png(root / "a" / "deeper" / "two.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (root / "b").mkdir()
    (root / "b" / "three.JPG").write_bytes(png_bytes(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "JPEG"))
    (root / "b" / "truncated.png").write_bytes((root / "a" / "one.png").read_bytes()[:40])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes((root / "a" / "one.png").read_bytes())
    write_png(root / ".cache" / "x.png", np.zeros((8, 8), np.uint8))
    return root


def test_folder_predictions_report_unreadable_files_without_failing(messy_folder: Path, tmp_path: Path) -> None:
    models = tiny_model(tmp_path / "models")
    out = tmp_path / "out" / "predictions.csv"
    report = run_predict(messy_folder, out, str(models), root=None)
    rows = read_csv(out)
    assert [r["file"] for r in rows] == ["a/deeper/two.png", "a/one.png", "b/three.JPG", "b/truncated.png", "empty.png"]
    assert list(rows[0]) == ["file", "class", "probability", "error"]
    assert (report.images, report.unreadable) == (5, 2)
    bad = {r["file"]: r for r in rows if r["error"]}
    assert set(bad) == {"b/truncated.png", "empty.png"} and all(r["class"] == "" for r in bad.values())
    # The readable ones: the classes the model gives the images as the prepare stage decodes them.
    good = [r for r in rows if not r["error"]]
    decoded = np.stack([decode_image(messy_folder / r["file"], 1, 8) for r in good])
    expected = ImagePredictor.from_folder(models).predict(decoded)
    assert [r["class"] for r in good] == expected["class"].tolist()
    assert [float(r["probability"]) for r in good] == pytest.approx(expected["probability"].tolist(), abs=1e-6)


def test_unknown_model_source_is_a_user_error(messy_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(CnnpipeError, match="not a models folder, a run id or a models:/ or runs:/ URI"):
        run_predict(messy_folder, tmp_path / "p.csv", str(tmp_path / "no-such-models"), root=None)
    assert not (tmp_path / "p.csv").exists()


def test_cli_missing_folder_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = cli(str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cnnpipe predict: error: {tmp_path / 'nowhere'}: not a folder"]
    assert not (tmp_path / "p.csv").exists()


def test_cli_with_a_models_folder_warns_once_about_unreadable_files(messy_folder: Path, tmp_path: Path) -> None:
    models = tiny_model(tmp_path / "models")
    proc = cli(str(messy_folder), "--model", str(models), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [f"[predict] warning: 2 unreadable image(s): rows with an error in {tmp_path / 'p.csv'}"]
    assert len(read_csv(tmp_path / "p.csv")) == 5


def test_default_csv_is_per_folder_in_the_project_whatever_the_working_folder(
    messy_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --out: `<project>/predictions/<folder name>.csv`, its folder made; a re-run replaces it, and nothing
    lands in the working folder."""
    models, project, elsewhere = tiny_model(tmp_path / "models"), tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = project / "predictions" / "images.csv"
    for _ in range(2):
        report = run_predict(messy_folder, None, str(models), root=project)
        assert report.out == expected and len(read_csv(expected)) == 5
        assert f"[predict] 5 image(s) -> {expected} (model {models})" in capsys.readouterr().err
    assert [p.name for p in (project / "predictions").iterdir()] == ["images.csv"]  # replaced, no temp file left
    assert not any(elsewhere.iterdir())
    # Without a project (a copied script): ./predictions/, shown as typed from here.
    run_predict(messy_folder, None, str(models), root=None)
    assert len(read_csv(elsewhere / "predictions" / "images.csv")) == 5
    assert "-> predictions/images.csv (model" in capsys.readouterr().err


def test_cli_default_csv_is_under_predictions_which_git_ignores(messy_folder: Path, tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    models = tiny_model(tmp_path / "models")
    proc = cli(str(messy_folder), "--model", str(models), project=project)
    assert proc.returncode == 0, proc.stderr
    assert f"[predict] 5 image(s) -> predictions/images.csv (model {models})" in proc.stderr.splitlines()
    assert len(read_csv(project / "predictions" / "images.csv")) == 5
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True)
    assert status.stdout == ""  # predictions/ is ignored: the default output never clutters `git status`


def test_out_naming_a_folder_is_a_user_error(messy_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(CnnpipeError, match="is a folder; --out names the CSV file to write"):
        run_predict(messy_folder, tmp_path, str(tiny_model(tmp_path / "models")), root=None)


# ---------------------------------------------------------------- with the trained pipeline: slow


@pytest.fixture(scope="module")
def project(trained_project: Path) -> Path:
    return trained_project


@pytest.fixture(scope="module")
def digit_folder(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real test digits as PNGs in one folder per label, plus a broken file."""
    test = load_split(project / "data/prepared/test.npz")
    root = tmp_path_factory.mktemp("digits")
    for i, (image, label) in enumerate(zip(test.images[:60], test.labels[:60], strict=True)):
        write_png(root / str(label) / f"{i:03d}.png", image[0])
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing after")
    return root


@pytest.mark.slow
def test_cli_default_is_the_registered_champion(project: Path, digit_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    proc = cli(str(digit_folder), "--out", str(out), project=project)
    assert proc.returncode == 0, proc.stderr
    assert "(model models:/cnnpipe-digits@champion)" in proc.stderr
    assert proc.stderr.count("warning") == 1 and "1 unreadable image(s)" in proc.stderr
    rows = read_csv(out)
    assert len(rows) == 61 and [r["file"] for r in rows if r["error"]] == ["broken.png"]
    good = [r for r in rows if not r["error"]]
    accuracy = np.mean([r["class"] == r["file"].split("/")[0] for r in good])
    assert accuracy >= 0.8, accuracy
    assert all(0 < float(r["probability"]) <= 1 for r in good)


@pytest.mark.slow
def test_run_id_registry_version_and_models_folder_give_the_same_csv(
    project: Path, digit_folder: Path, tmp_path: Path
) -> None:
    """The champion is the pipeline's train run: its id, its registered version and models/ are one model."""
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    sources = {
        "champion": None,
        "version": "models:/cnnpipe-digits/1",
        "run id": run_id,
        "runs uri": f"runs:/{run_id}/model",
        "folder": str(project / "models"),
    }
    texts = {}
    for name, source in sources.items():
        run_predict(digit_folder, tmp_path / f"{name}.csv", source, root=project)
        texts[name] = (tmp_path / f"{name}.csv").read_text()
    assert len(set(texts.values())) == 1, {k: v[:300] for k, v in texts.items()}


@pytest.mark.slow
def test_a_model_missing_from_the_registry_names_it_and_the_store(project: Path, digit_folder: Path) -> None:
    with pytest.raises(CnnpipeError) as err:
        run_predict(digit_folder, project / "never.csv", "models:/cnnpipe-nothing@champion", root=project)
    message = str(err.value)
    assert message.startswith("models:/cnnpipe-nothing@champion: cannot load the model from sqlite:///")
    assert "\n" not in message and not (project / "never.csv").exists()
