"""The bad-input corpus: generated here, each case with its expected outcome, run through the real
`prepare` entry (`run_stage`) in-process: usable images used, unusable ones skipped and reported, and what
cannot work at all is one line naming the file or folder with exit code 2."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnpipe.stages.prepare import prepare_splits
from cnnpipe.stages.runner import run_stage
from tests.helpers import ROOT, write_png

rng = np.random.default_rng(7)


def noise(h: int = 12, w: int = 12, c: int | None = None) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Just what `prepare` needs: conf/ and params.yaml; the cwd, as under DVC."""
    root = tmp_path / "project"
    shutil.copytree(ROOT / "conf", root / "conf")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    monkeypatch.chdir(root)
    return root


def prepare(*overrides: str) -> None:
    run_stage("prepare", lambda cfg, root: prepare_splits(cfg, root / cfg.paths.prepared), argv=list(overrides))


def build_corpus(root: Path) -> dict[str, set[str]]:
    """A messy folder; returns the files expected to be skipped (with the class they sit in)."""
    alpha, beta, gamma = root / "Alpha", root / "beta", root / "gamma"
    alpha.mkdir(parents=True)
    for i in range(3):
        write_png(beta / f"b{i}.png", noise())
        write_png(gamma / f"g{i}.png", noise())
    # Every Pillow mode, odd names, sizes and orientation: all usable.
    Image.fromarray(noise() > 128).convert("1").save(alpha / "IMG_BILEVEL.PNG")
    Image.fromarray(noise()).save(alpha / "gray.png")
    Image.fromarray(noise(c=3)).convert("P").save(alpha / "palette.gif")
    Image.fromarray(noise(c=3)).save(alpha / "rgb.bmp")
    Image.fromarray(noise(c=4), mode="RGBA").save(alpha / "rgba.webp")
    Image.fromarray(noise().astype(np.uint16) * 257).save(alpha / "deep16.png")
    Image.fromarray(noise(c=3)).convert("CMYK").save(alpha / "cmyk.jpg")
    Image.fromarray(noise(1, 1)).save(alpha / "tiny_1x1.png")
    Image.fromarray(noise(1000, 800)).save(alpha / "HUGE.TIFF")  # 0.8 Mpx: under the lowered limit
    Image.fromarray(noise(c=3)).save(alpha / "ñandú_猫.png")
    exif_img = Image.fromarray(noise(12, 20, 3))
    exif = exif_img.getexif()
    exif[0x0112] = 6
    exif_img.save(alpha / "rotated.jpg", exif=exif)
    # Unusable: skipped and listed.
    (beta / "truncated.png").write_bytes((beta / "b0.png").read_bytes()[:50])
    (beta / "zero.png").write_bytes(b"")
    (beta / "not_an_image.jpg").write_text("hello")
    Image.fromarray(noise(1500, 1500)).save(gamma / "bomb.png")  # 2.25 Mpx: over 2x the lowered limit
    # Ignored: hidden files, non-image files, a symlink loop, an empty class folder.
    (gamma / ".hidden.png").write_bytes((gamma / "g0.png").read_bytes())
    (gamma / "notes.txt").write_text("not an image")
    os.symlink(gamma, gamma / "loop")
    (root / "empty_class").mkdir()
    return {"beta": {"truncated.png", "zero.png", "not_an_image.jpg"}, "gamma": {"bomb.png"}}


def test_messy_folder_uses_what_it_can_and_reports_the_rest(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000 * 1000)  # the bomb guard, scaled down for speed
    images = tmp_path / "images"
    expected = build_corpus(images)
    prepare("data=imagefolder", f"data.path={images}", "data.channels=3", "data.image_size=16")
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["classes"] == ["Alpha", "beta", "gamma"]  # the empty class folder has no usable image
    assert meta["counts"]["train"]["total"] + meta["counts"]["val"]["total"] + meta["counts"]["test"]["total"] == 17
    skipped = {(Path(s["file"]).parent.name, Path(s["file"]).name) for s in meta["skipped"]}
    assert skipped == {(cls, name) for cls, names in expected.items() for name in names}
    assert all(s["reason"] for s in meta["skipped"])
    assert meta["ignored_files"] == 2  # .hidden.png, notes.txt (the symlinked folder is not followed)
    assert meta["image_shape"] == [3, 16, 16]
    err = capsys.readouterr().err
    # one warning for the skipped files; the other is prepare's class check (Alpha 7 train images to beta's 1)
    assert err.count("warning:") == 2 and err.count("skipped 4 unreadable image(s)") == 1 and "class imbalance" in err


def _idx(path: Path, arr: np.ndarray, magic: bytes | None = None) -> None:
    head = magic or bytes([0, 0, 0x08, arr.ndim])
    data = head + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data))


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("missing", "images"),
        ("empty", "images"),
        ("one_class", "images"),
        ("class_of_one", "images/b"),
        ("idx_magic", "images/train-images-idx3-ubyte.gz"),
        ("idx_length", "images/train-labels-idx1-ubyte.gz"),
    ],
)
def test_what_cannot_work_is_one_line_naming_it_and_exit_2(
    project: Path, tmp_path: Path, case: str, names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    source = ["data=imagefolder", f"data.path={images}"]
    if case == "empty":
        images.mkdir()
    elif case == "one_class":
        for i in range(5):
            write_png(images / "a" / f"{i}.png", noise())
    elif case == "class_of_one":
        for i in range(5):
            write_png(images / "a" / f"{i}.png", noise())
        write_png(images / "b" / "only.png", noise())
    elif case.startswith("idx"):
        images.mkdir()
        source = ["data=mnist_idx", f"data.path={images}"]
        x, y = rng.integers(0, 256, (4, 28, 28)), np.arange(4) % 2
        for split in ("train", "t10k"):
            bad_magic = case == "idx_magic" and split == "train"
            _idx(images / f"{split}-images-idx3-ubyte.gz", x, magic=b"\x12\x34\x08\x03" if bad_magic else None)
            _idx(images / f"{split}-labels-idx1-ubyte.gz", y)
        if case == "idx_length":
            path = images / "train-labels-idx1-ubyte.gz"
            path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    with pytest.raises(SystemExit) as exit_info:
        prepare(*source)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines may come first
    errors = [line for line in lines if "error" in line]
    assert errors == lines[-1:] and errors[0].startswith("cnnpipe prepare: error: ")
    assert str(tmp_path / names) in errors[0]
    assert not (project / "data").exists()  # nothing written
