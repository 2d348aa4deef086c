"""End to end on photos: a tiny timm network fine-tuned on a folder of drawn RGB photos by the real `dvc repro`
(prepare -> augment -> sweep -> train -> evaluate, `model=timm`, `augment=photo`), served from the registry's
champion by `mlflow models serve`, and refused in one line when its pretrained weights are missing offline.

Nothing is downloaded: the "pretrained" weights are timm's own tiny test networks (`test_resnet.r160_in1k`,
`test_efficientnet.r160_in1k`, untrained), saved by the test as safetensors and given as `model.weights` (or put
in a Hugging Face cache of the test's own). At the end, a sweep over model.arch: refused with one weights file, run
from the hub cache."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from cnnpipe.data.store import load_split
from cnnpipe.models.predictor import ImagePredictor
from tests.helpers import (
    BIN,
    Server,
    clone_project,
    compose_params,
    copy_project,
    dvc,
    free_port,
    run,
    server_env,
    stage_env,
    stage_runs,
)

pytestmark = pytest.mark.slow

ARCH = "test_resnet.r160_in1k"  # timm's 0.5 M-parameter test ResNet: crop_pct 0.95, bilinear, mean/std 0.5
OTHER_ARCH = "test_efficientnet.r160_in1k"  # crop_pct 0.95 too, but bicubic
INPUT_SIZE = 32
STORED_SIZE = math.floor(INPUT_SIZE / 0.95)  # 33: prepare stores input_size / crop_pct, the net crops the centre
CLASSES = ("blue triangle", "green square", "red circle")  # folder names with a space; prepare sorts them
PER_CLASS = 18
REGISTERED = "cnnpipe-imagefolder"  # cnnpipe-<data.name>
EXPERIMENT = "cnnpipe-imagefolder"
COLOURS = {"red circle": (220, 40, 40), "green square": (40, 190, 60), "blue triangle": (40, 70, 220)}


# ---------------------------------------------------------------- the photos and the weights


def draw_photo(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy grey background with one coloured shape about its centre: uint8 (height, width, 3). The shape lies in
    the central square (what prepare and serving keep of a non-square image) and is big enough to survive crops."""
    grey = int(rng.integers(80, 176))
    img = Image.new("RGB", (width, height), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    r = side * rng.uniform(0.3, 0.42)
    cx = width / 2 + rng.uniform(-0.08, 0.08) * side
    cy = height / 2 + rng.uniform(-0.08, 0.08) * side
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[kind])
    if kind == "red circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == "green square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def non_square_size(rng: np.random.Generator, low: int = 40, high: int = 70) -> tuple[int, int]:
    while True:
        width, height = (int(v) for v in rng.integers(low, high + 1, 2))
        if abs(width - height) >= 4:
            return width, height


def draw_folder(root: Path, seed: int = 0) -> Path:
    """PER_CLASS photos a class, PNG and JPEG alternately, each its own non-square size."""
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = draw_photo(kind, *non_square_size(rng), rng)
            if i % 2:
                Image.fromarray(pixels).save(root / kind / f"photo {i:02d}.jpg", quality=90)
            else:
                Image.fromarray(pixels).save(root / kind / f"photo {i:02d}.png")
    return root


def save_weights(arch: str, path: Path) -> Path:
    """A timm network's state dict (its original 1000-class head included), as a user's downloaded weights file."""
    import timm
    from safetensors.torch import save_file

    net = timm.create_model(arch, pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return draw_folder(tmp_path_factory.mktemp("photos") / "my photos")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    return {arch: save_weights(arch, folder / f"{arch}.safetensors") for arch in (ARCH, OTHER_ARCH)}


def photo_overrides(photos: Path, *extra: str, arch: str | None = ARCH) -> list[str]:
    """The photo pipeline, shortened as tests/helpers.SHORT shortens the digits one: a 2-trial sweep over the
    learning rates, one worker, batches of 16. Not over model.arch: one model.weights file cannot fit two
    architectures (refused: see the tests at the end). 6 epochs: an epoch of 36 photos at 32 px takes ~0.15 s, the
    stage process ~15 s, and 2 epochs (the first with the backbone frozen) leave the net near chance.
    `arch=None`: conf/model/timm.yaml's default architecture."""
    return [
        "data=imagefolder",
        f"data.path={photos}",
        f"data.image_size={INPUT_SIZE}",
        "data.batch_size=16",
        "model=timm",
        *([f"model.arch={arch}"] if arch else []),
        "augment=photo",
        "train.epochs=6",
        "sweep.n_trials=2",
        "sweep.workers=1",
        "~sweep.space.batch_size",
        "~sweep.space.epochs",
        "sweep.space.lr.low=0.002",
        "sweep.space.lr.high=0.02",
        "+sweep.space.backbone_lr={key: optim.backbone_lr, type: float, low: 0.3, high: 1.0, log: true}",
        *extra,
    ]


# ---------------------------------------------------------------- the pipeline: dvc repro once for the module


@pytest.fixture(scope="module")
def repro(
    photos: Path, weights: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    project = copy_project(tmp_path_factory.mktemp("photo-e2e") / "project")
    compose_params(project, *photo_overrides(photos, f"model.weights={weights[ARCH]}"))
    started = time.monotonic()
    proc = dvc("repro", cwd=project)
    print(f"photo pipeline dvc repro: {time.monotonic() - started:.1f} s")
    return project, proc


@pytest.fixture(scope="module")
def project(repro: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    return repro[0]


def store(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def test_repro_runs_every_stage_on_the_photos(repro: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    project, proc = repro
    for stage in ("prepare", "augment", "sweep", "train", "evaluate"):
        assert f"Running stage '{stage}'" in proc.stdout, stage
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["classes"] == sorted(CLASSES)
    assert meta["skipped"] == [] and sum(meta["counts"][s]["total"] for s in ("train", "val", "test")) == 54
    assert meta["preprocess"] == {
        "input_size": INPUT_SIZE,
        "storage_size": STORED_SIZE,
        "interpolation": "bilinear",
        "crop_pct": pytest.approx(0.95),
    }
    assert meta["image_shape"] == [3, STORED_SIZE, STORED_SIZE]
    for rel in ("data/prepared/train.npz", "data/prepared/test.npz", "data/augmented/train.npz"):
        images = load_split(project / rel).images
        assert images.shape[1:] == (3, STORED_SIZE, STORED_SIZE) and images.dtype == np.uint8, rel

    spec = json.loads((project / "models/model.json").read_text())
    assert spec["model"]["name"] == "timm" and spec["model"]["arch"] == ARCH
    assert spec["input_size"] == INPUT_SIZE and spec["interpolation"] == "bilinear"
    assert spec["in_shape"] == [3, STORED_SIZE, STORED_SIZE] and spec["classes"] == sorted(CLASSES)
    # Normalised with the network's pretrained mean/std (timm's config), not the photos' own.
    assert spec["mean"] == pytest.approx([0.5] * 3) and spec["std"] == pytest.approx([0.5] * 3)
    # The monitor's reference: the timm head's input is the embedding; the photos' source sizes are the range.
    from cnnpipe.monitoring.reference import load_reference

    ref = load_reference(project / "models/reference.npz")
    assert ref.layer is not None and ref.sample["embedding"].shape[0] == ref.info["images"] > 0
    assert ref.info["size_min"] == [meta["checks"]["source"]["width"]["min"], meta["checks"]["source"]["height"]["min"]]
    assert "width" not in ref.sample  # folder images: sizes per image unknown after prepare, the range stands

    best = yaml.safe_load((project / "sweep/best_params.yaml").read_text())
    assert set(best["params"]) == {"optim.lr", "optim.backbone_lr"}
    metrics = json.loads((project / "eval/metrics.json").read_text())["test"]
    print(f"photo pipeline test acc: {metrics['acc']:.3f}")
    assert metrics["acc"] >= 2 / 3  # 9 test photos, 3 classes (chance 1/3); 1.0 when measured


def test_mlflow_train_run_and_champion(project: Path, weights: dict[str, Path]) -> None:
    client = store(project)
    runs = stage_runs(client, "train", EXPERIMENT)
    assert len(runs) == 1
    train_run = runs[0]
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    assert train_run.info.run_id == run_id and train_run.info.status == "FINISHED"
    tags = train_run.data.tags
    assert tags["cnnpipe.input_size"] == str(INPUT_SIZE) and tags["cnnpipe.stored_size"] == str(STORED_SIZE)
    assert tags["cnnpipe.interpolation"] == "bilinear"
    assert str(weights[ARCH]) in tags["cnnpipe.pretrained_weights"]
    assert train_run.data.params["model.arch"] == ARCH
    evaluated = json.loads((project / "eval/metrics.json").read_text())["test"]
    assert train_run.data.metrics["test/acc"] == pytest.approx(evaluated["acc"])
    assert len(stage_runs(client, "trial", EXPERIMENT)) == 2
    sweeps = stage_runs(client, "sweep", EXPERIMENT)
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert tags["cnnpipe.sweep_run_id"] == sweeps[0].info.run_id
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert champion.run_id == run_id


# ---------------------------------------------------------------- serving the champion


@pytest.fixture(scope="module")
def served(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{REGISTERED}@champion", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with Server(cmd, f"http://127.0.0.1:{port}/ping", log, server_env(project)):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def predicted(project: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """`python pipelines/predict.py <photos>` with the champion: one row per file."""
    out = tmp_path_factory.mktemp("predict") / "photos.csv"
    run([sys.executable, "pipelines/predict.py", str(photos), "--out", str(out)], project)
    return pd.read_csv(out, keep_default_na=False).set_index("file")


def check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert row["error"] is None and row["class"] in CLASSES, row
        probs = {k.removeprefix("prob_"): v for k, v in row.items() if k.startswith("prob_")}
        assert set(probs) == set(CLASSES)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert row["probability"] == pytest.approx(max(probs.values())) and probs[row["class"]] == row["probability"]


def test_served_champion_answers_photo_files_as_predict_py_does(
    served: str, photos: Path, predicted: pd.DataFrame
) -> None:
    """PNG and JPEG files, base64 in MLflow's JSON: the server's answer is predict.py's for the same file."""
    files = [f"{kind}/photo 00.png" for kind in CLASSES] + [f"{CLASSES[0]}/photo 01.jpg"]
    payload = {"inputs": [base64.b64encode((photos / f).read_bytes()).decode() for f in files]}
    reply = requests.post(f"{served}/invocations", json=payload, timeout=60)
    assert reply.status_code == 200, reply.text[:500]
    rows = reply.json()["predictions"]
    assert len(rows) == len(files)
    check_rows(rows)
    for name, row in zip(files, rows, strict=True):
        local = predicted.loc[name]
        assert row["class"] == local["class"], name
        assert row["probability"] == pytest.approx(float(local["probability"]), abs=1e-5), name
    accuracy = np.mean([f.split("/")[0] == c for f, c in zip(predicted.index, predicted["class"], strict=True)])
    print(f"predict.py accuracy on the whole folder: {accuracy:.3f}")
    assert (predicted["error"] == "").all() and len(predicted) == len(CLASSES) * PER_CLASS
    assert accuracy >= 0.8  # mostly photos it trained on; 0.98 when measured


def test_served_champion_answers_a_raw_pixel_array(served: str, project: Path) -> None:
    """An (H, W, 3) array of another non-square size: cropped and resized as the model's spec says."""
    rng = np.random.default_rng(7)
    pixels = draw_photo("red circle", 77, 51, rng)  # a size no training photo has, wider than tall
    reply = requests.post(f"{served}/invocations", json={"inputs": [pixels.tolist()]}, timeout=60)
    assert reply.status_code == 200, reply.text[:500]
    rows = reply.json()["predictions"]
    assert len(rows) == 1
    check_rows(rows)
    local = ImagePredictor.from_folder(project / "models").predict(pixels[None])
    assert rows[0]["class"] == local.loc[0, "class"]
    assert rows[0]["probability"] == pytest.approx(float(local.loc[0, "probability"]), abs=1e-5)


# ---------------------------------------------------------------- missing weights, offline


@pytest.fixture(scope="module")
def unweighted(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project prepared (prepare + augment) for model=timm with model.weights unset."""
    project = copy_project(tmp_path_factory.mktemp("unweighted") / "project")
    compose_params(project, *photo_overrides(photos))
    for stage in ("prepare", "augment"):
        run([sys.executable, f"pipelines/{stage}.py"], project)
    return project


def offline_env(hf_home: Path) -> dict[str, str]:
    """The stage environment with `hf_home` as the only Hugging Face cache, and the hub offline."""
    env = {k: v for k, v in stage_env().items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    return env | {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def files_under(project: Path) -> set[str]:
    return {p.relative_to(project).as_posix() for p in project.rglob("*") if ".git" not in p.parts}


@pytest.mark.parametrize("weights_file", [False, True], ids=["no-weights", "another-archs-weights"])
@pytest.mark.parametrize("stage", ["train", "sweep"])
def test_missing_weights_offline_is_one_line_exit_2_nothing_written(
    unweighted: Path, stage: str, weights_file: bool, weights: dict[str, Path], tmp_path: Path
) -> None:
    """No weights anywhere, or a file of another architecture's (found only by loading it): refused before the
    stage opens an MLflow run or a checkpoint folder."""
    hub = tmp_path / "empty-hf-home"
    hub.mkdir()
    env = offline_env(hub)
    before = files_under(unweighted)
    cmd = [sys.executable, f"pipelines/{stage}.py", *(["train.hparams=params"] if stage == "train" else [])]
    if weights_file:
        cmd.append(f"model.weights={weights[OTHER_ARCH]}")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=unweighted, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"cnnpipe {stage}: error:") and ARCH in lines[0] and "model.weights" in lines[0]
    if weights_file:
        assert "do not fit" in lines[0]
    assert elapsed < 30, elapsed
    assert files_under(unweighted) == before
    for folder in ("models", "checkpoints", "sweep"):
        assert not (unweighted / folder).exists() or not any((unweighted / folder).iterdir()), folder
    if (unweighted / "mlflow.db").exists():
        assert stage_runs(store(unweighted), stage, EXPERIMENT) == []


# ---------------------------------------------------------------- what a changed model setting re-runs


def dvc_status(project: Path) -> dict:
    return json.loads(dvc("status", "--json", cwd=project).stdout or "{}")


def test_changing_the_arch_reruns_prepare_and_changing_the_weights_does_not(
    project: Path, photos: Path, weights: dict[str, Path], tmp_path: Path
) -> None:
    clone = clone_project(project, tmp_path / "project")
    assert dvc_status(clone) == {}
    # Other weights for the same network: the stored photos stay, every stage that trains re-runs.
    other_file = shutil.copy(weights[ARCH], tmp_path / "resnet-v2.safetensors")
    compose_params(clone, *photo_overrides(photos, f"model.weights={other_file}"))
    assert set(dvc_status(clone)) == {"sweep", "train"}
    # Another network: prepare re-runs, since what it stores follows the network's crop_pct and interpolation.
    compose_params(clone, *photo_overrides(photos, f"model.weights={weights[OTHER_ARCH]}", arch=OTHER_ARCH))
    assert set(dvc_status(clone)) == {"prepare", "sweep", "train"}
    proc = dvc("repro", "prepare", cwd=clone)
    assert "Running stage 'prepare'" in proc.stdout
    meta = json.loads((clone / "data/prepared/meta.json").read_text())
    assert meta["preprocess"]["interpolation"] == "bicubic"  # test_efficientnet's
    assert meta["preprocess"]["storage_size"] == STORED_SIZE  # its crop_pct is 0.95 too
    status = dvc_status(clone)
    assert "prepare" not in status and "augment" in status  # augment's input changed: it runs next


# ---------------------------------------------------------------- a sweep over model.arch: known bugs


ARCH_SPACE = f"+sweep.space.arch={{key: model.arch, type: categorical, choices: [{ARCH}, {OTHER_ARCH}]}}"


@pytest.fixture
def arch_sweep_project(unweighted: Path, photos: Path, tmp_path: Path) -> Path:
    """The prepared photo project, with model.arch left at conf/'s default: a model.arch that params.yaml sets is
    the user's, and pins the search (stages/sweep.py pin_explicit), so an arch sweep leaves it unset."""
    project = tmp_path / "project"
    shutil.copytree(unweighted, project, symlinks=True)
    compose_params(project, *photo_overrides(photos, arch=None))
    return project


def test_arch_sweep_with_one_weights_file_is_refused_before_any_trial(
    arch_sweep_project: Path, weights: dict[str, Path]
) -> None:
    cmd = [sys.executable, "pipelines/sweep.py", f"model.weights={weights[ARCH]}", ARCH_SPACE, "train.epochs=1"]
    proc = run(cmd, arch_sweep_project, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "model.weights" in lines[0] and OTHER_ARCH in lines[0]
    assert not (arch_sweep_project / "sweep").exists()


def fake_hub_cache(home: Path, weights: dict[str, Path]) -> Path:
    """A Hugging Face cache (HF_HOME) holding timm/<arch>'s model.safetensors for each arch, as a download leaves it."""
    commit = "0" * 40
    for arch, file in weights.items():
        repo = home / "hub" / f"models--timm--{arch}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        shutil.copy(file, repo / "snapshots" / commit / "model.safetensors")
    return home


def test_arch_sweep_offline_from_the_hub_cache(
    arch_sweep_project: Path, weights: dict[str, Path], tmp_path: Path
) -> None:
    env = offline_env(fake_hub_cache(tmp_path / "hf", weights))
    cmd = [sys.executable, "pipelines/sweep.py", ARCH_SPACE, "train.epochs=1"]
    proc = subprocess.run(cmd, cwd=arch_sweep_project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((arch_sweep_project / "sweep/best_params.yaml").read_text())
    assert best["params"]["model.arch"] in (ARCH, OTHER_ARCH)
