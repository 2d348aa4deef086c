"""Output paths can never destroy the project (issue #11): `paths.*` is checked before anything runs, and an
output folder is replaced only when it holds nothing but what its stage writes. Also: params.yaml must be a
non-empty mapping of valid YAML."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnnpipe.atomic import OutputFolderError, atomic_dir
from cnnpipe.config import load_config
from cnnpipe.errors import CnnpipeError, ConfigError
from tests.helpers import ROOT, copy_project, names_key, stage_env


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """Just what load_config needs: conf/ and params.yaml."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "conf", root / "conf")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    for folder in ("src/cnnpipe", ".git", ".dvc", "pipelines", "tests", "data/prepared"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


# --- config validation --------------------------------------------------------------------------

REFUSED = [
    (["paths.prepared=."], "paths.prepared"),
    (["paths.prepared=''"], "paths.prepared"),
    (["paths.prepared=.."], "paths.prepared"),
    (["paths.prepared=/"], "paths.prepared"),
    (["paths.prepared=data/../.."], "paths.prepared"),
    (["paths.augmented=../elsewhere"], "paths.augmented"),
    (["paths.prepared=src"], "paths.prepared"),
    (["paths.prepared=src/cnnpipe"], "paths.prepared"),
    (["paths.models=.git"], "paths.models"),
    (["paths.eval=.git/hooks"], "paths.eval"),
    (["paths.checkpoints=.dvc/tmp"], "paths.checkpoints"),
    (["paths.sweep=conf"], "paths.sweep"),
    (["paths.sweep=pipelines"], "paths.sweep"),
    (["paths.optuna=tests"], "paths.optuna"),
    (["paths.optuna=.."], "paths.optuna"),
    (["paths.models=eval"], "paths.models"),
    (["paths.eval=models/eval"], "paths.eval"),
    (["paths.prepared=data"], "paths.prepared"),  # holds paths.augmented (data/augmented)
    (["paths.checkpoints=sweep"], "paths.checkpoints"),
    (["paths.sweep=params.yaml"], "paths.sweep"),  # a file, not a folder
    # outside the project without paths.allow_outside
    (["paths.prepared=/tmp/cnnpipe-somewhere-outside"], "paths.prepared"),
]


@pytest.mark.parametrize(("overrides", "key"), REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_dangerous_output_paths_are_refused(project: Path, overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides, root=project)
    message = str(err.value)
    assert names_key(message, key), message
    assert "\n" not in message


def test_outside_the_project_only_when_asked_for(project: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "prepared"
    with pytest.raises(ConfigError, match=r"paths\.allow_outside"):
        load_config([f"paths.prepared={outside}"], root=project)
    cfg = load_config([f"paths.prepared={outside}", "paths.allow_outside=true"], root=project)
    assert cfg.paths.prepared == str(outside)
    # asking for it does not allow the project itself, a folder above it, or its sources
    for value in (".", "..", str(tmp_path), "/", "src", ".git/x"):
        with pytest.raises(ConfigError) as err:
            load_config([f"paths.prepared={value}", "paths.allow_outside=true"], root=project)
        assert names_key(str(err.value), "paths.prepared"), str(err.value)


def test_symlinks_are_followed(project: Path, tmp_path: Path) -> None:
    """`data` linked to a folder outside the project puts data/prepared outside: refused unless asked for;
    a link to the project's own sources is refused either way."""
    shutil.rmtree(project / "data")
    (tmp_path / "big-disk").mkdir()
    (project / "data").symlink_to(tmp_path / "big-disk")
    with pytest.raises(ConfigError) as err:
        load_config([], root=project)
    assert names_key(str(err.value), "paths.prepared"), str(err.value)
    load_config(["paths.allow_outside=true"], root=project)
    (project / "out").symlink_to(project / "src")
    with pytest.raises(ConfigError) as err:
        load_config(["paths.models=out", "paths.allow_outside=true"], root=project)
    assert names_key(str(err.value), "paths.models"), str(err.value)


def test_usual_paths_are_accepted(project: Path) -> None:
    load_config([], root=project)
    load_config(["paths.models=models-b", "paths.eval=eval-b", "paths.prepared=data/other/prepared"], root=project)
    load_config(["paths.checkpoints=./ck", "paths.optuna=state/optuna"], root=project)


def test_optuna_storage_of_a_dvc_experiment_copy(project: Path) -> None:
    """DVC runs queued experiments in `.dvc/tmp/exps/...` copies: their Optuna storage is the original
    project's (store_root), which is not 'inside .dvc' of the copy."""
    copy = project / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    shutil.copytree(project / "conf", copy / "conf")
    shutil.copy(project / "params.yaml", copy / "params.yaml")
    load_config([], root=copy)
    with pytest.raises(ConfigError) as err:
        load_config(["paths.optuna=.git"], root=copy)
    assert names_key(str(err.value), "paths.optuna"), str(err.value)


# --- params.yaml --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "{}\n", "null\n"])
def test_empty_params_file_is_refused(tmp_path: Path, text: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(root=ROOT, params=params)
    assert str(params) in str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\noptim:\n  lr: [0.1\n  name: sgd\n: :\n")
    with pytest.raises(ConfigError) as err:
        load_config(root=ROOT, params=params)
    message = str(err.value)
    assert str(params) in message and "\n" not in message
    assert "line " in message, message


# --- the mechanism: atomic_dir ------------------------------------------------------------------


def tree(folder: Path) -> dict[str, str]:
    """Every file and link under `folder` (bytecode caches aside) with a digest of its content."""
    listing = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in [*filenames, *(d for d in dirnames if Path(dirpath, d).is_symlink())]:
            path = Path(dirpath, name)
            rel = path.relative_to(folder).as_posix()
            listing[rel] = os.readlink(path) if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
        listing.update({Path(dirpath, d).relative_to(folder).as_posix() + "/": "" for d in dirnames})
    return listing


def test_atomic_dir_refuses_a_folder_holding_a_foreign_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "train.npz").write_bytes(b"old")
    (target / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(OutputFolderError) as err, atomic_dir(target, names=["train.npz"]) as tmp:
        (tmp / "train.npz").write_bytes(b"new")
    assert isinstance(err.value, CnnpipeError)
    assert str(target) in str(err.value) and "notes.txt" in str(err.value) and "\n" not in str(err.value)
    assert tree(tmp_path) == before  # nothing removed, nothing left behind
    # also when the stage does not declare its names up front: checked before the swap
    with pytest.raises(OutputFolderError), atomic_dir(target) as tmp:
        (tmp / "train.npz").write_bytes(b"new")
    assert tree(tmp_path) == before


def test_atomic_dir_refuses_a_file_and_a_folder_holding_folders(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "outer" / "sub").mkdir(parents=True)
    (tmp_path / "outer" / "sub" / "keep.txt").write_text("mine")  # the stage writes sub/, but not sub/keep.txt
    before = tree(tmp_path)
    for target in (tmp_path / "file", tmp_path / "outer", tmp_path):
        with pytest.raises(OutputFolderError), atomic_dir(target) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "file").write_text("x")
        assert tree(tmp_path) == before


def test_atomic_dir_replaces_what_it_wrote(tmp_path: Path) -> None:
    target = tmp_path / "out"
    for content in (b"one", b"two"):
        with atomic_dir(target, names=["a.bin", "b.bin"]) as tmp:
            (tmp / "a.bin").write_bytes(content)
        assert (target / "a.bin").read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a folder written by an older version (no marker of any kind): only the stage's files -> replaced
    (target / "b.bin").write_bytes(b"older")
    with atomic_dir(target, names=["a.bin", "b.bin"]) as tmp:
        (tmp / "a.bin").write_bytes(b"three")
    assert sorted(p.name for p in target.iterdir()) == ["a.bin"]
    # an empty folder (made by hand) is fine too
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "empty" / "x").read_text() == "x"


# --- the real stage, in a copy of the project ---------------------------------------------------


def run_prepare(root: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**stage_env(), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "pipelines/prepare.py", *overrides], cwd=root, env=env, capture_output=True, text=True
    )


def assert_refused(result: subprocess.CompletedProcess[str], word: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and word in lines[0], result.stderr


@pytest.mark.slow
def test_prepare_refuses_the_project_root_and_leaves_everything(tmp_path: Path) -> None:
    """The reported bug: `paths.prepared=.` deleted the whole project. Only ever run in a copy."""
    root = copy_project(tmp_path / "copy")
    (root / "uncommitted.txt").write_text("precious")
    before = tree(tmp_path)
    for value in (".", "..", str(tmp_path / "outside")):
        assert_refused(run_prepare(root, f"paths.prepared={value}"), "paths.prepared")
        assert tree(tmp_path) == before
    assert_refused(run_prepare(root, "paths.models=eval"), "paths.models")
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_prepare_refuses_a_folder_holding_a_users_file(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "copy")
    (root / "mine").mkdir()
    (root / "mine" / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    assert_refused(run_prepare(root, "paths.prepared=mine"), "mine")
    assert tree(tmp_path) == before
    # the committed params.yaml is valid, and prepare replaces its own output on a re-run
    for _ in range(2):
        ok = run_prepare(root)
        assert ok.returncode == 0, ok.stderr
    assert {p.name for p in (root / "data" / "prepared").iterdir()} == {"train.npz", "val.npz", "test.npz", "meta.json"}


@pytest.mark.slow
def test_empty_params_file_stops_the_stage(tmp_path: Path) -> None:
    root = copy_project(tmp_path / "copy")
    (root / "params.yaml").write_text("")
    before = tree(tmp_path)
    assert_refused(run_prepare(root), "params.yaml")
    assert tree(tmp_path) == before
