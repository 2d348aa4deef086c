"""Raw images in, classes out: the preprocessing (fast, a small untrained model), the logged pyfunc model, and
`mlflow models serve` answering real digit images from the registry's champion (slow)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
import requests

from cnnpipe.data.images import decode_image
from cnnpipe.data.store import load_split
from cnnpipe.errors import DataError
from cnnpipe.models.predictor import ImagePredictor
from tests.helpers import BIN, Server, free_port, png_bytes, server_env, tiny_model

CHAMPION = "models:/cnnpipe-digits@champion"


# ---------------------------------------------------------------- preprocessing: fast, no MLflow


@pytest.fixture
def gray(tmp_path: Path) -> ImagePredictor:
    return ImagePredictor.from_folder(tiny_model(tmp_path / "models"))


@pytest.fixture
def rgb(tmp_path: Path) -> ImagePredictor:
    return ImagePredictor.from_folder(tiny_model(tmp_path / "models_rgb", channels=3))


def random_images(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy(dtype=np.float64)


def test_every_array_layout_and_container_gives_the_same_answer(gray: ImagePredictor) -> None:
    x = random_images(5, 1, 8, 8)
    expected = gray.predict(x)
    assert list(expected.columns) == ["class", "probability", "prob_cat", "prob_dog", "prob_eel", "error"]
    p = probs(expected)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert list(expected["probability"]) == pytest.approx(p.max(axis=1).tolist())
    assert list(expected["class"]) == [["cat", "dog", "eel"][i] for i in p.argmax(axis=1)]
    assert expected["error"].isna().all()
    same_images = {
        "(N,H,W)": x[:, 0],
        "(N,H,W,C)": x.transpose(0, 2, 3, 1),
        "JSON numbers (int64)": x.astype(np.int64).tolist(),
        "whole floats": x.astype(np.float32),
        "a column of images": pd.DataFrame({"image": list(x[:, 0])}),
        "a dict": {"image": x},
    }
    for name, value in same_images.items():
        np.testing.assert_allclose(probs(gray.predict(value)), p, rtol=1e-6, err_msg=name)


def test_arrays_are_fitted_to_the_models_channels_and_size(gray: ImagePredictor, rgb: ImagePredictor) -> None:
    big = random_images(3, 16, 16, 3)  # RGB, twice the size: luma + resize as the array data sources do
    assert gray.predict(big)["error"].isna().all()
    assert rgb.predict(random_images(3, 8, 8))["error"].isna().all()  # gray -> 3 channels
    rgba = np.concatenate([big, np.full((3, 16, 16, 1), 255, np.uint8)], axis=3)  # opaque alpha changes nothing
    np.testing.assert_allclose(probs(rgb.predict(rgba)), probs(rgb.predict(big)), rtol=1e-6)


def test_encoded_files_are_decoded_exactly_as_prepare_decodes_them(rgb: ImagePredictor, tmp_path: Path) -> None:
    """PNG, JPEG, RGBA, 16-bit, other sizes: the bytes path and `decode_image` on the file agree bit for bit."""
    rng = np.random.default_rng(1)
    files = {
        "rgb.png": png_bytes(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)),
        "photo.jpg": png_bytes(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), "JPEG", quality=80),
        "alpha.png": png_bytes(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)),
        "deep.png": png_bytes(rng.integers(0, 65536, (9, 9), dtype=np.uint16)),
        "gray.webp": png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8), "WEBP"),
    }
    decoded = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        decoded.append(decode_image(tmp_path / name, 3, 8))
    from_bytes = rgb.predict(list(files.values()))
    from_base64 = rgb.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in files.values()]}))
    from_prepare = rgb.predict(np.stack(decoded))
    np.testing.assert_array_equal(probs(from_bytes), probs(from_prepare))
    np.testing.assert_array_equal(probs(from_base64), probs(from_prepare))


def test_an_undecodable_item_marks_only_its_row(gray: ImagePredictor) -> None:
    good = png_bytes(random_images(1, 8, 8)[0])
    out = gray.predict([good, b"not an image", "%%not base64%%", good])
    assert out["error"].isna().tolist() == [True, False, False, True]
    assert out.loc[1, "error"].startswith("UnidentifiedImageError") and "BytesIO" not in out.loc[1, "error"]
    assert "base64" in out.loc[2, "error"]
    assert out.loc[1, "class"] is None and out.loc[1, "probability"] is None  # JSON null, not NaN
    assert out.loc[0, "class"] == out.loc[3, "class"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.random.default_rng(0).random((2, 8, 8)), "scaled to [0, 1]"),
        (np.full((2, 8, 8), 300), "integers 0..255"),
        (np.zeros((2, 1, 1, 8, 8), np.uint8), "(N, H, W)"),
        (np.zeros((2, 5, 8, 8), np.uint8), "channel axis"),
        (np.zeros((0, 8, 8), np.uint8), "no images"),
        (pd.DataFrame({"a": [1], "b": [2]}), "column 'image'"),
    ],
)
def test_unusable_arrays_raise_one_line_naming_the_problem(gray: ImagePredictor, bad: object, message: str) -> None:
    with pytest.raises(DataError) as err:
        gray.predict(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_models_record_says_crop_or_squash(gray: ImagePredictor) -> None:
    """A model saved with the preprocessing record (input_size in its spec) was trained on each image's central
    square: a wide image loses its sides. One saved before it was trained on whole images squashed square, and is
    served that way still."""
    wide = np.zeros((8, 16), dtype=np.uint8)
    wide[:, :4] = 255  # the left quarter white: outside the central square
    recorded = gray
    old = ImagePredictor(gray.net, {k: v for k, v in gray.spec.items() if k not in ("input_size", "interpolation")})
    assert recorded.square and not old.square
    legacy = old.predict(png_bytes(wide))
    from cnnpipe.data.inputs import to_batch

    squashed = to_batch(png_bytes(wide), [1, 8, 8], square=False).images[0, 0]
    cropped = to_batch(png_bytes(wide), [1, 8, 8], square=True).images[0, 0]
    assert squashed[:, 0].min() == 255 and cropped.max() == 0
    probs = [c for c in legacy.columns if c.startswith("prob_")]
    expected = old.probabilities(squashed[None, None])[0]
    assert np.allclose(legacy[probs].to_numpy(dtype=float)[0], expected)
    expected = recorded.probabilities(cropped[None, None])[0]
    assert np.allclose(recorded.predict(png_bytes(wide))[probs].to_numpy(dtype=float)[0], expected)


# ---------------------------------------------------------------- the logged model and the server: slow


@pytest.fixture(scope="module")
def project(trained_project: Path) -> Path:
    return trained_project


@pytest.fixture(scope="module")
def digits(project: Path) -> tuple[np.ndarray, np.ndarray]:
    """60 real test-split digits (uint8, N x 1 x 8 x 8) and their labels."""
    test = load_split(project / "data/prepared/test.npz")
    return test.images[:60], test.labels[:60]


@pytest.fixture(scope="module")
def served(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with Server(cmd, f"http://127.0.0.1:{port}/ping", log, server_env(project)):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_logged_model_is_pickle_free_with_signature_and_example(project: Path) -> None:
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("cnnpipe-digits", "champion")
    model_id = version.source.removeprefix("models:/")
    model_dir = Path(urlparse(client.get_logged_model(model_id).artifact_location).path)  # a local store
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert {"artifacts/cnnpipe_model/model.safetensors", "artifacts/cnnpipe_model/model.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".ckpt"))]
    meta = Model.load(model_dir)
    outputs = meta.signature.outputs.input_names()
    assert outputs[:2] == ["class", "probability"] and outputs[-1] == "error"
    assert outputs[2:-1] == [f"prob_{d}" for d in range(10)]
    example = meta.load_input_example(model_dir)
    pixels = np.asarray(example, dtype=np.int64)  # stored as JSON; the signature's object tensor loads it as such
    assert pixels.shape[1:] == (1, 8, 8) and pixels.min() >= 0 and pixels.max() <= 255
    out = mlflow.pyfunc.load_model(str(model_dir)).predict(example)
    assert out["error"].isna().all() and set(out["class"]) <= {str(d) for d in range(10)}


@pytest.mark.slow
def test_served_champion_classifies_digit_arrays_in_every_layout(
    served: str, project: Path, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = digits
    local = ImagePredictor.from_folder(project / "models").predict(images)  # the champion is the pipeline's model
    payloads = {
        "inputs (N,H,W)": {"inputs": images[:, 0].tolist()},
        "inputs (N,C,H,W)": {"inputs": images.tolist()},
        "instances (N,H,W,C)": {"instances": images.transpose(0, 2, 3, 1).tolist()},
    }
    for name, payload in payloads.items():
        reply = requests.post(f"{served}/invocations", json=payload, timeout=60)
        assert reply.status_code == 200, (name, reply.text[:500])
        rows = reply.json()["predictions"]
        classes = [r["class"] for r in rows]
        assert classes == local["class"].tolist(), name
        assert [r["probability"] for r in rows] == pytest.approx(local["probability"].tolist(), rel=1e-5)
        accuracy = np.mean([c == str(y) for c, y in zip(classes, labels, strict=True)])
        assert accuracy >= 0.8, (name, accuracy)


@pytest.mark.slow
def test_served_champion_classifies_png_and_jpeg_bytes(served: str, digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = digits
    arrays = requests.post(f"{served}/invocations", json={"inputs": images[:, 0].tolist()}, timeout=60).json()
    pngs = [base64.b64encode(png_bytes(im[0])).decode() for im in images]
    # Bigger RGB JPEGs: decoded, made gray, shrunk to 8x8 by the model's own preprocessing.
    jpegs = [
        base64.b64encode(png_bytes(np.repeat(np.kron(im[0], np.ones((4, 4), np.uint8))[..., None], 3, 2), "JPEG"))
        for im in images
    ]
    payloads = {
        "dataframe_split PNG": {"dataframe_split": {"columns": ["image"], "data": [[b] for b in pngs]}},
        "dataframe_records JPEG": {"dataframe_records": [{"image": b.decode()} for b in jpegs]},
    }
    for name, payload in payloads.items():
        reply = requests.post(f"{served}/invocations", json=payload, timeout=60)
        assert reply.status_code == 200, (name, reply.text[:500])
        classes = [r["class"] for r in reply.json()["predictions"]]
        accuracy = np.mean([c == str(y) for c, y in zip(classes, labels, strict=True)])
        assert accuracy >= 0.75, (name, accuracy)
        if "PNG" in name:  # lossless: the very pixels of the array request, so the very same answer
            assert reply.json() == arrays


@pytest.mark.slow
def test_served_model_answers_bad_input_with_400_or_a_row_error(
    served: str, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = digits
    reply = requests.post(f"{served}/invocations", json={"inputs": (images[:2] / 255.0).tolist()}, timeout=60)
    assert reply.status_code == 400 and "scaled to [0, 1]" in reply.json()["message"]
    good = base64.b64encode(png_bytes(images[0, 0])).decode()
    reply = requests.post(f"{served}/invocations", json={"inputs": [good, "bm90IGFuIGltYWdl"]}, timeout=60)
    assert reply.status_code == 200
    first, second = reply.json()["predictions"]
    assert first["error"] is None and first["class"] is not None
    assert second["class"] is None and second["probability"] is None and "UnidentifiedImageError" in second["error"]
    json.dumps(reply.json(), allow_nan=False)  # strict JSON: no NaN anywhere
