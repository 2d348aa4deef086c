"""The evaluate stage's pictures of what the model gets wrong (issue #13): the error gallery and errors.csv, the
most-confused pairs, the reliability diagram, against independent computations; every picture a real PNG of the
test images (8x8 grey and 64-px RGB crops), in eval/, in the train run's artifacts and among its keyed images."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torchmetrics.functional.classification import multiclass_calibration_error

from cnnpipe.data.store import Split, save_split
from cnnpipe.evaluation.calibration import (
    calibration_records,
    expected_calibration_error,
    plot_reliability,
    reliability_bins,
)
from cnnpipe.evaluation.gallery import (
    RIGHT,
    WRONG,
    confused_examples,
    confused_pairs_figure,
    error_gallery_figure,
    most_confused,
    plot_confused_pairs,
    plot_error_gallery,
    rank_by_loss,
)
from cnnpipe.evaluation.metrics import classification_metrics
from cnnpipe.figures import plt
from cnnpipe.models.factory import build_model
from cnnpipe.models.store import save_model
from tests.helpers import ROOT, tiny_model
from tests.tiny import conf_section

DIGITS = (*(f"digit {i}" for i in range(9)), "a class name far too long for a title")
PICTURES = ("errors.png", "confused.png", "calibration.png", "confusion.png", "cam/cam.png")
KEYS = ("eval~errors", "eval~confused", "eval~calibration", "eval~confusion", "eval~cam")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per-image -log softmax(logits)[label], in float64 numpy: independent of the code under test."""
    x = logits.double().numpy()
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return log_z - x[np.arange(len(x)), labels.numpy()]


def by_loss(loss: np.ndarray, among: np.ndarray | None = None) -> list[int]:
    """Indices by loss, highest first, ties by index."""
    idx = np.arange(len(loss)) if among is None else np.flatnonzero(among)
    return [int(i) for i in idx[np.lexsort((idx, -loss[idx]))]]


def random_case(n: int = 60, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Logits, labels and distinct 8x8 grey images; two images share logits and label (a tie in loss)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    logits[9], labels[9] = logits[4], labels[4]
    images = np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    return logits, labels, images


def drawn(ax: plt.Axes) -> np.ndarray:
    return np.asarray(ax.images[0].get_array())


def inked(path: Path) -> float:
    """The fraction of the picture that is not white background: thumbnails cover much, a sentence little."""
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).astype(np.int16)
    return float((pixels.min(axis=-1) < 235).mean())


def test_the_gallery_is_the_highest_loss_images_highest_first() -> None:
    logits, labels, images = random_case()
    loss = cross_entropy(logits, labels)
    probs = logits.double().softmax(1).numpy()
    everyone = rank_by_loss(logits, labels)
    assert [r.index for r in everyone] == by_loss(loss)
    assert [r.index for r in everyone].index(4) < [r.index for r in everyone].index(9)  # a tie: lower index first
    ranked = everyone[:16]
    assert [r.rank for r in ranked] == list(range(1, 17))
    for r in ranked:
        assert r.loss == pytest.approx(loss[r.index], abs=1e-5)
        assert r.predicted == probs[r.index].argmax() and r.wrong == (r.predicted != labels[r.index])
        assert r.p_predicted == pytest.approx(probs[r.index].max(), abs=1e-6)
        assert r.p_actual == pytest.approx(probs[r.index, labels[r.index]], abs=1e-6)
    classes = [f"class {i}" for i in range(5)]
    fig = error_gallery_figure(images, ranked, classes)
    try:
        cells = [ax for ax in fig.axes if ax.images]
        assert len(cells) == 16
        for ax, r in zip(cells, ranked, strict=True):  # the drawn pixels are those images, in rank order
            assert np.array_equal(drawn(ax), images[r.index, 0])
            title = ax.title.get_text()
            assert title == f"true: {classes[r.actual]}\npred: {classes[r.predicted]} (p={r.p_predicted:.2f})"
            assert ax.title.get_color() == (WRONG if r.wrong else RIGHT)
    finally:
        plt.close(fig)


def test_most_confused_pairs_are_the_largest_off_diagonal_cells_with_their_worst_examples() -> None:
    logits, labels, images = random_case(n=80, c=4, seed=1)
    predicted = logits.argmax(1)
    counts = Counter((int(a), int(p)) for a, p in zip(labels, predicted, strict=True) if a != p)
    expected = sorted(((a, p, n) for (a, p), n in counts.items()), key=lambda t: (-t[2], t[0], t[1]))[:5]
    pairs = most_confused(classification_metrics(logits, labels).confusion, top=5)
    assert pairs == expected and len(pairs) == 5
    loss = cross_entropy(logits, labels)
    shown = confused_examples(logits, labels, pairs, examples=3)
    for (a, p, n), row in zip(pairs, shown, strict=True):
        mistakes = (labels.numpy() == a) & (predicted.numpy() == p)
        assert [r.index for r in row] == by_loss(loss, mistakes)[:3] and len(row) == min(3, n)
    fig = confused_pairs_figure(images, pairs, shown, [f"c{i}" for i in range(4)])
    try:
        cells = [ax for ax in fig.axes if ax.images]
        assert [drawn(ax).tolist() for ax in cells] == [images[r.index, 0].tolist() for row in shown for r in row]
        labels_text = [t.get_text() for t in fig.texts]
        for a, p, n in pairs:
            assert f"c{a} → c{p}\n({n} image{'s' if n != 1 else ''})" in labels_text
    finally:
        plt.close(fig)


def test_reliability_bins_reproduce_torchmetrics_ece(tmp_path: Path) -> None:
    """Float32 softmax reaches exactly 1.0 for a confident image: torchmetrics gives those a bin of their own."""
    logits, labels, _ = random_case(n=200, c=6, seed=2)
    logits[:30] = 0.0
    logits[torch.arange(30), labels[:30]] = 40.0  # confidence 1.0, right
    logits[30:40] = 0.0
    logits[torch.arange(30, 40), (labels[30:40] + 1) % 6] = 40.0  # confidence 1.0, wrong
    bins = reliability_bins(logits, labels)
    ece = float(multiclass_calibration_error(logits.softmax(1), labels, 6, n_bins=15, norm="l1"))
    assert expected_calibration_error(bins) == pytest.approx(ece, abs=1e-6)
    assert sum(b.count for b in bins) == 200
    exact = [b for b in bins if b.bin == 15]
    assert len(exact) == 1 and exact[0].count == 40 and exact[0].accuracy == pytest.approx(0.75)
    confidence = logits.softmax(1).max(1).values
    for b in bins[:-1]:
        inside = (confidence >= b.lower) & (confidence < b.upper)
        assert b.count == int(inside.sum()) and b.lower == pytest.approx(b.bin / 15)
        assert b.confidence == pytest.approx(float(confidence[inside].double().mean()), abs=1e-6)
    records = calibration_records(bins)
    assert json.loads(json.dumps(records)) == records and set(records[0]) == set(asdict(bins[0]))
    plot_reliability(bins, ece, tmp_path / "calibration.png")
    with Image.open(tmp_path / "calibration.png") as png:
        assert 450 <= png.width <= 900 and 450 <= png.height <= 900


def test_no_mistakes_and_no_images_give_pictures_that_say_so(tmp_path: Path) -> None:
    labels = torch.arange(12) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float() * 6
    images = np.random.default_rng(0).integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    m = classification_metrics(logits, labels)
    assert plot_confused_pairs(images, logits, labels, m.confusion, ["a", "b", "c"], tmp_path / "confused.png") == []
    ranked = rank_by_loss(logits, labels)[:16]
    assert not any(r.wrong for r in ranked)  # the gallery still shows the highest-loss (right) ones
    plot_error_gallery(images, ranked, ["a", "b", "c"], tmp_path / "errors.png")
    plot_error_gallery(images, [], ["a", "b", "c"], tmp_path / "none.png")
    for name in ("confused.png", "none.png"):  # a sentence: a small picture, no thumbnails
        with Image.open(tmp_path / name) as png:
            assert 80 < png.height < 250 and 300 < png.width < 700
            grey = np.asarray(png.convert("RGB")).astype(np.int16)
        assert (np.ptp(grey, axis=-1) > 20).mean() < 0.01  # no colour: neither red frames nor thumbnails
    assert inked(tmp_path / "errors.png") > 0.3
    with Image.open(tmp_path / "errors.png") as png:
        assert png.height > 500


# ------------------------------------------------------------------ the stage: eval/, the report and MLflow


def tiny_vit(folder: Path, classes: tuple[str, ...]) -> Path:
    """timm's untrained test ViT for RGB images stored at 72 px, whose first layer takes the central 64 (as for
    photos). A ViT computes on tokens: class-activation maps do not apply to it."""
    spec = {
        "model": asdict(conf_section("model", name="timm", arch="test_vit")),
        "in_shape": [3, 72, 72],
        "classes": list(classes),
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "input_size": 64,
        "interpolation": "bilinear",
        "crop_pct": 64 / 72,
    }
    torch.manual_seed(0)
    save_model(folder, build_model(spec), spec)
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MlflowClient, str]:
    """A real SQLite MLflow store and an experiment in it: (tracking URI, client, experiment id)."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("pictures", artifact_location=(root / "artifacts").as_uri())


def evaluate(
    root: Path, images: np.ndarray, labels: np.ndarray, store: tuple[str, MlflowClient, str]
) -> tuple[Path, MlflowClient, str]:
    """The stage in-process on these test images, the saved model's train run a finished run of `store`."""
    from cnnpipe.config import load_config
    from cnnpipe.stages.evaluate import run_evaluation

    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id)
    (root / "models/run.json").write_text(json.dumps({"run_id": run_id}))
    (root / "data/prepared").mkdir(parents=True, exist_ok=True)
    save_split(root / "data/prepared/test.npz", Split(images, labels.astype(np.int64)))
    run_evaluation(load_config([f"tracking.uri={uri}", "tracking.register=false"], root=ROOT), root)
    return root / "eval", client, run_id


Evaluated = tuple[Path, MlflowClient, str]  # eval/, the store's client, the run evaluate logged into


@pytest.fixture(scope="module")
def grey(tmp_path_factory: pytest.TempPathFactory, store: tuple[str, MlflowClient, str]) -> Evaluated:
    """evaluate on 8x8 grey images of 10 classes with a CNN; eval/cam/ holds a stale not_applicable.txt from an
    earlier model."""
    root = tmp_path_factory.mktemp("grey")
    tiny_model(root / "models", classes=DIGITS)
    (root / "eval/cam").mkdir(parents=True)
    (root / "eval/cam/not_applicable.txt").write_text("stale\n")
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    return evaluate(root, images, np.arange(40) % 10, store)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory, store: tuple[str, MlflowClient, str]) -> Evaluated:
    """evaluate a ViT on RGB images stored at 72 px, each framed by a pure green 4-px border that the central 64-px
    crop (what the network sees, and so what the pictures show) cuts away; eval/cam/ holds a stale cam.png."""
    root = tmp_path_factory.mktemp("rgb")
    tiny_vit(root / "models", ("tabby cat", "Pembroke Welsh corgi", "café"))
    (root / "eval/cam").mkdir(parents=True)
    (root / "eval/cam/cam.png").write_bytes(b"a picture of an earlier model")
    rng = np.random.default_rng(1)
    images = np.zeros((24, 3, 72, 72), dtype=np.uint8)
    images[:, 1] = 255  # green
    images[:, :, 4:68, 4:68] = rng.integers(80, 180, (24, 3, 64, 64), dtype=np.uint8)  # muted: never pure green
    return evaluate(root, images, np.arange(24) % 3, store)


def green(path: Path) -> int:
    with Image.open(path) as png:
        r, g, b = np.moveaxis(np.asarray(png.convert("RGB")).astype(np.int16), -1, 0)
    return int(((g > 200) & (r < 60) & (b < 60)).sum())


@pytest.mark.slow  # the stage in-process (~3 s each), a real SQLite store (~5 s to create)
@pytest.mark.parametrize("case", ["grey", "rgb"])
def test_every_picture_is_a_readable_png_of_the_test_images(case: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue(case)[0]
    cam = case == "grey"  # a CNN gets class-activation maps, the ViT a sentence saying why not
    for name in PICTURES if cam else PICTURES[:-1]:
        with Image.open(out / name) as png:
            png.verify()
        with Image.open(out / name) as png:
            assert png.format == "PNG" and 300 <= png.width <= 2200 and 300 <= png.height <= 2200, (name, png.size)
            assert np.asarray(png.convert("L")).std() > 10, name
        if name != "cam/cam.png":  # evaluation/attribution.py's picture, sized there
            assert (out / name).stat().st_size < 600_000, name  # noise photos, the worst case: a few hundred KB
    assert inked(out / "errors.png") > 0.3 and inked(out / "confused.png") > 0.2  # thumbnails, not a sentence
    assert len(list(csv.DictReader(io.StringIO((out / "errors.csv").read_text())))) == 16
    # eval/cam/ holds one of its two files (a stale other removed), named in the report
    assert sorted(p.name for p in (out / "cam").iterdir()) == (["cam.png"] if cam else ["not_applicable.txt"])
    report = (out / "report.md").read_text()
    if cam:
        assert "![class-activation maps](cam/cam.png)" in report
    else:
        reason = (out / "cam/not_applicable.txt").read_text().strip()
        assert "tokens" in reason and "cam.png" not in report and "Not drawn: class\\-activation maps" in report
        assert green(out / "errors.png") == 0 and green(out / "confused.png") == 0  # the central crop, no border


@pytest.mark.slow
def test_errors_csv_is_the_highest_loss_test_images_of_the_model(grey: Evaluated) -> None:
    """errors.csv against the saved model's logits and an independent cross-entropy."""
    from cnnpipe.data.store import load_split
    from cnnpipe.models.store import load_published

    out = grey[0]
    net, spec, _ = load_published(out.parent / "models")
    test = load_split(out.parent / "data/prepared/test.npz")
    labels = torch.from_numpy(test.labels)
    with torch.no_grad():
        logits = net.eval()(torch.from_numpy(test.images).float() / 255)
    loss = cross_entropy(logits, labels)
    rows = list(csv.DictReader(io.StringIO((out / "errors.csv").read_text())))
    assert [int(r["index"]) for r in rows] == by_loss(loss)[:16]
    assert [int(r["rank"]) for r in rows] == list(range(1, 17))
    for r in rows:
        i = int(r["index"])
        assert r["true"] == spec["classes"][test.labels[i]] and float(r["loss"]) == pytest.approx(loss[i], abs=1e-5)
        assert r["predicted"] == spec["classes"][int(logits[i].argmax())]
        assert float(r["p_true"]) == pytest.approx(float(np.exp(-loss[i])), abs=1e-5)
    records = json.loads((out / "calibration.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    assert sum(r["count"] for r in records) == 40
    ece = sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in records) / 40
    assert ece == pytest.approx(metrics["ece"], abs=1e-5)  # records rounded to 6 places
    assert "top3_acc" in metrics and "top5_acc" not in metrics  # 10 classes


@pytest.mark.slow
@pytest.mark.parametrize("case", ["grey", "rgb"])
def test_the_run_has_every_file_and_the_pictures_as_keyed_images(
    case: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    out, client, run_id = request.getfixturevalue(case)
    cam = case == "grey"
    logged = {a.path for a in client.list_artifacts(run_id, "eval")} | {
        a.path for a in client.list_artifacts(run_id, "eval/cam")
    }
    expected = {"metrics.json", "per_class.csv", "confusion.json", "errors.csv", "calibration.json"}
    expected |= {"report.md", "report.html", *PICTURES[:-1], "cam/cam.png" if cam else "cam/not_applicable.txt"}
    assert logged == {f"eval/{name}" for name in expected} | {"eval/cam"}
    images = [a.path for a in client.list_artifacts(run_id, "images")]  # images/<key, / as ~>+step+0+...
    for key in KEYS if cam else KEYS[:-1]:
        mine = [p for p in images if p.startswith(f"images/{key}+step+0+")]
        assert {Path(p).suffix for p in mine} == {".png", ".webp"}, (key, images)  # full size + MLflow's preview
    assert len(images) == 2 * (len(KEYS) if cam else len(KEYS) - 1)
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages") == "True"
    [errors] = [p for p in images if p.startswith("images/eval~errors+") and p.endswith(".png")]
    with (
        Image.open(client.download_artifacts(run_id, errors, str(tmp_path))) as keyed,
        Image.open(out / "errors.png") as local,
    ):
        assert np.array_equal(np.asarray(keyed.convert("RGB")), np.asarray(local.convert("RGB")))


def test_class_activation_maps_that_fail_cost_no_other_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A network captum cannot trace: one warning line, the reason in eval/cam/not_applicable.txt (a stale cam.png
    removed), and the gallery, pairs and calibration written as always."""
    import cnnpipe.stages.evaluate as stage

    def traced_badly(*args: object, **kwargs: object) -> None:
        raise RuntimeError("hook saw a tensor it did not expect\nsecond line")

    monkeypatch.setattr(stage, "plot_class_activation_maps", traced_badly)
    logits, labels, images = random_case()
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam/cam.png").write_bytes(b"an earlier model's")
    classes = [f"class {i}" for i in range(5)]
    net = torch.nn.Identity()
    m = classification_metrics(logits, labels)
    reason = stage.write_pictures(tmp_path, net, torch.from_numpy(images), labels, logits, m, classes, None, "cpu")
    assert reason == "class-activation maps failed: RuntimeError: hook saw a tensor it did not expect"
    assert (tmp_path / "cam/not_applicable.txt").read_text() == reason + "\n"
    assert not (tmp_path / "cam/cam.png").exists()
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("errors.png", "confused.png", "calibration.png"))
    assert "[evaluate] warning: class-activation maps failed: RuntimeError" in capsys.readouterr().err
