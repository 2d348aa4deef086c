"""Hostile input (issue #11 items 6, 7): broken split files and meta.json, a full disk, and class names users
really have, each one line (exit 2) or handled, never a traceback."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnpipe.data.store import Split, load_meta, load_split, save_split
from cnnpipe.errors import DataError
from cnnpipe.evaluation.metrics import per_class_metric_names
from cnnpipe.evaluation.report import md_text
from tests.helpers import ROOT, copy_project, prepared_copy, stage_env, write_png

HOSTILE = [
    "c++",
    "cat&dog",
    "O'Reilly",
    "$(rm -rf x)",
    "a|b",
    "line\nbreak",
    "café",
    "猫",
    "-lead",
    "with space",
    "a..b",
    "`tick` <b>*x*<i> [l](u)",  # no `/`: it cannot be in a folder name
]


# ---------------------------------------------------------------- split files and meta.json: one DataError


META = {"classes": ["a", "b", "c"], "num_classes": 3, "image_shape": [1, 4, 4], "mean": [0.5], "std": [0.2]}


def write_prepared(folder: Path, images: np.ndarray, labels: np.ndarray, meta: dict[str, object] = META) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_split(folder / "val.npz", Split(images, labels))
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "val.npz"


def one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("labels", "problem"),
    [(np.array([0, 1, 3]), "label 3 out of range [0, 3)"), (np.array([0, -1, 2]), "label -1 out of range")],
)
def test_labels_out_of_range_name_the_file(tmp_path: Path, labels: np.ndarray, problem: str) -> None:
    path = write_prepared(tmp_path / "prepared", np.zeros((3, 1, 4, 4), np.uint8), labels)
    for mmap in (False, True):
        with pytest.raises(DataError) as exc:
            load_split(path, mmap=mmap)
        assert str(path) in one_line(exc) and problem in str(exc.value)


def test_a_split_of_another_shape_than_meta_names_the_file(tmp_path: Path) -> None:
    """The train/val shape mismatch: augmented/train.npz from an older prepare (no meta.json beside it)."""
    prepared = tmp_path / "prepared"
    write_prepared(prepared, np.zeros((3, 1, 4, 4), np.uint8), np.arange(3))
    augmented = tmp_path / "augmented" / "train.npz"
    augmented.parent.mkdir()
    save_split(augmented, Split(np.zeros((3, 1, 8, 8), np.uint8), np.arange(3)))
    with pytest.raises(DataError) as exc:
        load_split(augmented, mmap=True, meta=load_meta(prepared))
    assert str(augmented) in one_line(exc) and "[1, 8, 8]" in str(exc.value) and "[1, 4, 4]" in str(exc.value)


@pytest.mark.parametrize(
    ("images", "labels", "problem"),
    [
        (np.zeros((3, 4, 4), np.uint8), np.arange(3), "expected uint8 (N, C, H, W)"),
        (np.zeros((3, 1, 4, 4), np.float32), np.arange(3), "expected uint8 (N, C, H, W)"),
        (np.zeros((3, 1, 4, 4), np.uint8), np.arange(2), "one per image"),
        (np.zeros((3, 1, 4, 4), np.uint8), np.array([0.0, 1.0, 2.0]), "one per image"),
    ],
)
def test_malformed_arrays_name_the_file(tmp_path: Path, images: np.ndarray, labels: np.ndarray, problem: str) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, images=images, labels=labels)
    with pytest.raises(DataError) as exc:
        load_split(path)
    assert str(path) in one_line(exc) and problem in str(exc.value)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"num_classes": None}, "'num_classes' key"),
        ({"image_shape": None}, "'image_shape' key"),
        ({"mean": None, "std": None}, "'mean', 'std' key"),
        ({"classes": "abc"}, "'classes' must be a list"),
        ({"num_classes": 4}, "'num_classes' must be"),
        ({"image_shape": [1, 4]}, "'image_shape' must be"),
        ({"std": [0.1, 0.2]}, "'std' must be one number per channel"),
    ],
)
def test_a_meta_json_without_a_needed_key_names_file_and_key(tmp_path: Path, change: dict, problem: str) -> None:
    meta = {k: v for k, v in {**META, **change}.items() if not (k in change and change[k] is None)}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as exc:
        load_meta(tmp_path)
    assert str(tmp_path / "meta.json") in one_line(exc) and problem in str(exc.value)
    for text in ("[1, 2]", "\xff\xfe"):
        (tmp_path / "meta.json").write_bytes(text.encode("latin-1"))
        with pytest.raises(DataError) as exc:
            load_meta(tmp_path)
        assert str(tmp_path / "meta.json") in one_line(exc)


# ---------------------------------------------------------------- class names as metric names and markdown


def test_class_names_become_valid_distinct_stable_mlflow_metric_names() -> None:
    from mlflow.utils.validation import _validate_metric_name

    names = [*HOSTILE, "...", "..", ".", "", "x" * 400, "cat", "7", "c__", "c__-cedb1b"]
    keys = per_class_metric_names("test/f1", names)
    for key in keys:
        _validate_metric_name(key)  # raises MlflowException for a name the store refuses
        assert len(key) <= 250
    assert len(set(keys)) == len(keys)
    assert keys == per_class_metric_names("test/f1", names)  # deterministic
    assert keys[names.index("cat")] == "test/f1/cat" and keys[names.index("7")] == "test/f1/7"  # unchanged
    assert keys[names.index("café")] == "test/f1/café"


def test_report_table_keeps_one_row_per_class_with_the_true_names() -> None:
    from cnnpipe.evaluation.metrics import TestMetrics
    from cnnpipe.evaluation.report import report_markdown

    n = len(HOSTILE)
    m = TestMetrics(
        summary={"acc": 0.5, "f1_macro": 0.5, "precision_macro": 0.5, "recall_macro": 0.5, "ece": 0.1, "loss": 1.0},
        per_class={k: [0.5] * n for k in ("precision", "recall", "f1", "support")},
        confusion=None,  # type: ignore[arg-type]
    )
    text = report_markdown(m, HOSTILE, 10, "abc", "cnn")
    lines = text.splitlines()
    start = lines.index("| class | precision | recall | F1 | support |") + 2
    rows = lines[start : start + n]
    assert len(rows) == n and lines[start + n] == ""
    for row, name in zip(rows, HOSTILE, strict=True):
        cells = re.split(r"(?<!\\)\|", row)[1:-1]  # unescaped pipes only
        assert len(cells) == 5, row
        assert cells[0].strip() == md_text(name)
    assert "<b>" not in text and "$(" not in text and "a|b" not in text


# ---------------------------------------------------------------- a full disk: one line, nothing half-written


def tmpfs(folder: Path, size: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode(errors='replace').strip()}")
    return folder


def umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmpfs(tmp_path / "project" / "tiny", "64k")  # inside the project: paths must be
    yield folder
    umount(folder)


@pytest.mark.slow
def test_prepare_on_a_full_disk_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, tiny_disk: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "conf", project / "conf", dirs_exist_ok=True)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    shutil.copytree(ROOT / "pipelines", project / "pipelines")
    proc = subprocess.run(
        [sys.executable, "pipelines/prepare.py", "paths.prepared=tiny/prepared"],
        cwd=project,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("cnnpipe prepare: error: no space left on device writing ")
    assert errors[0].split(" writing ")[1].startswith("tiny/prepared/train.npz")  # not atomic.py's temporary name
    assert list(tiny_disk.iterdir()) == []  # nothing half-written, no temporary left


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_exit_2_and_its_run_failed(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = prepared_copy(tmp_path / "project")
    disk = tmpfs(project / "tiny", "16k")  # room for the checkpoints' folder, not for the model
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "pipelines/train.py",
                "augment=none",
                "train.hparams=params",
                "train.epochs=1",
                "trainer.threads=1",
                "paths.models=tiny/models",
            ],
            cwd=project,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        leftovers = [p.name for p in disk.rglob("*") if p.is_file()]
    finally:
        umount(disk)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnpipe train: error: no space left on device writing tiny/models/"), last
    assert leftovers == []
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]


# ---------------------------------------------------------------- hostile class names, prepare to predict


@pytest.mark.slow
def test_hostile_class_names_go_through_prepare_train_evaluate_and_predict(tmp_path: Path) -> None:
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c, name in enumerate(HOSTILE):
        for i in range(4):
            img = (rng.random((8, 8)) * 40).astype(np.uint8)
            img[c % 8, :] = 230
            write_png(images / name / f"{i}.png", img)
    write_png(images / "..." / "0.png", np.zeros((8, 8), np.uint8))  # hidden folder: ignored, as documented
    project = copy_project(tmp_path / "project")
    source = [
        "data=imagefolder",
        f"data.path={images}",
        "data.image_size=8",
        "augment=none",
        "train.hparams=params",
        "train.epochs=1",
        "trainer.threads=1",
    ]

    def stage(name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, f"pipelines/{name}.py", *source, *extra],
            cwd=project,
            env=stage_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        return proc

    for name in ("prepare", "augment", "train", "evaluate"):
        stage(name)
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert sorted(meta["classes"]) == sorted(HOSTILE)  # the true names, in meta.json
    classes = meta["classes"]
    with open(project / "eval/per_class.csv", newline="", encoding="utf-8") as fh:
        assert [row["class"] for row in csv.DictReader(fh)] == classes
    confusion = json.loads((project / "eval/confusion.json").read_text())
    assert {r["actual"] for r in confusion} <= set(classes)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    metrics = client.get_run(run_id).data.metrics
    assert {k for k in metrics if k.startswith("test/f1/")} == set(per_class_metric_names("test/f1", classes))
    versions = client.search_model_versions("name='cnnpipe-imagefolder'")
    assert len(versions) == 1  # registered

    out = tmp_path / "predictions.csv"  # through the registered pyfunc model: prob_<class> columns and all
    predict = subprocess.run(
        [
            sys.executable,
            "pipelines/predict.py",
            str(images),
            "--model",
            "models:/cnnpipe-imagefolder/1",
            "--out",
            str(out),
        ],
        cwd=project,
        env={**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * len(HOSTILE)
    assert {r["class"] for r in rows} <= set(classes) and all(r["error"] == "" for r in rows)
