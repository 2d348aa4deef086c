"""Data: stratified split, IDX reader, image sources, decoding, prepared splits on disk."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnpipe.config import SplitConfig, load_config
from cnnpipe.data.idx import read_idx
from cnnpipe.data.images import ImageDecodeError, decode_image
from cnnpipe.data.sources import fit_images, load_digits_source, load_source
from cnnpipe.data.split import SPLITS, stratified_split
from cnnpipe.data.store import Split, load_meta, load_split, save_split
from cnnpipe.errors import DataError
from cnnpipe.stages.prepare import prepare_splits
from tests.helpers import ROOT, make_image_folder, write_png
from tests.tiny import conf_section, config_from

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: tiny tensors, a busy machine


# --- stratified split ---------------------------------------------------------------------------


def imbalanced_labels() -> np.ndarray:
    counts = {0: 10, 1: 7, 2: 3, 3: 25, 5: 4}  # label 4 absent: labels need not be contiguous
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    return np.random.default_rng(1).permutation(labels)


def test_every_class_in_every_split() -> None:
    labels = imbalanced_labels()
    splits = stratified_split(labels, SplitConfig(0.7, 0.1, 0.2), seed=0)
    assert set(splits) == set(SPLITS)
    for name in SPLITS:
        assert set(labels[splits[name]]) == set(labels), name


def test_splits_are_disjoint_and_cover_all_indices() -> None:
    labels = imbalanced_labels()
    splits = stratified_split(labels, SplitConfig(0.7, 0.1, 0.2), seed=0)
    sizes = [len(splits[s]) for s in SPLITS]
    together = np.concatenate([splits[s] for s in SPLITS])
    assert sum(sizes) == len(labels)
    assert np.array_equal(np.sort(together), np.arange(len(labels)))
    for idx in splits.values():
        assert idx.dtype.kind == "i"
        assert np.array_equal(idx, np.sort(idx))


def test_split_sizes_follow_the_ratios() -> None:
    labels = np.repeat(np.arange(4), 100)
    splits = stratified_split(labels, SplitConfig(0.6, 0.15, 0.25), seed=3)
    for cls in range(4):
        assert [int((labels[splits[s]] == cls).sum()) for s in SPLITS] == [60, 15, 25]


def test_split_is_seeded() -> None:
    labels = imbalanced_labels()
    ratios = SplitConfig(0.7, 0.1, 0.2)
    a, b = stratified_split(labels, ratios, seed=5), stratified_split(labels, ratios, seed=5)
    assert all(np.array_equal(a[s], b[s]) for s in SPLITS)
    c = stratified_split(labels, ratios, seed=6)
    assert not all(np.array_equal(a[s], c[s]) for s in SPLITS)


def test_class_too_small_to_split_is_a_data_error() -> None:
    labels = np.array([0] * 10 + [1] * 2 + [2] * 10)
    with pytest.raises(DataError, match="'dogs'"):
        stratified_split(labels, SplitConfig(0.7, 0.1, 0.2), seed=0, class_names=["cats", "dogs", "owls"])
    with pytest.raises(DataError, match=r"'1' has 2"):
        stratified_split(labels, SplitConfig(0.7, 0.1, 0.2), seed=0)


def test_class_of_three_gets_one_per_split() -> None:
    labels = np.array([0] * 3 + [1] * 30)
    splits = stratified_split(labels, SplitConfig(0.7, 0.1, 0.2), seed=0)
    for s in SPLITS:
        assert int((labels[splits[s]] == 0).sum()) == 1


# --- IDX ----------------------------------------------------------------------------------------

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = struct.pack(">BBBB", 0, 0, IDX_CODES[dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_uint8(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    got = read_idx(write_idx(tmp_path / name, images))
    assert got.shape == (5, 4, 3)
    assert got.dtype == np.uint8
    assert np.array_equal(got, images)


@pytest.mark.parametrize("dtype", [np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_other_dtypes(tmp_path: Path, dtype: str) -> None:
    values = np.array([[-3, 0, 7], [100, -100, 1]]).astype(dtype)
    got = read_idx(write_idx(tmp_path / "x.idx.gz", values))
    assert got.shape == (2, 3)
    assert np.array_equal(got, values)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda b: b"\x01" + b[1:], id="first-byte"),
        pytest.param(lambda b: b[:2] + b"\x0a" + b[3:], id="dtype-code"),
        pytest.param(lambda b: b[:2], id="too-short"),
        pytest.param(lambda b: b"\x89PNG" + b[4:], id="png"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_wrong_magic(tmp_path: Path, mangle, gz: bool) -> None:
    data = mangle(idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8)))
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_idx(path)


@pytest.mark.parametrize("delta", [-1, -9, 1, 5])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_wrong_length(tmp_path: Path, delta: int, gz: bool) -> None:
    data = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    path = tmp_path / ("short.gz" if gz else "short")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_idx(path)


def test_read_idx_truncated_header_and_bad_gzip(tmp_path: Path) -> None:
    header_only = tmp_path / "header"
    header_only.write_bytes(struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">I", 2))
    with pytest.raises(DataError, match=re.escape(str(header_only))):
        read_idx(header_only)
    not_gzip = tmp_path / "labels.gz"
    not_gzip.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match=re.escape(str(not_gzip))):
        read_idx(not_gzip)
    with pytest.raises(DataError, match="missing-file"):
        read_idx(tmp_path / "missing-file")


def make_idx_folder(folder: Path, n_train: int = 30, n_test: int = 12, size: int = 6) -> tuple:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    y_train = (np.arange(n_train) % 3).astype(np.uint8)
    y_test = (np.arange(n_test) % 3).astype(np.uint8)
    write_idx(folder / "train-images-idx3-ubyte.gz", x_train)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y_train)
    write_idx(folder / "t10k-images-idx3-ubyte", x_test)
    write_idx(folder / "t10k-labels-idx1-ubyte", y_test)
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])


def test_mnist_idx_source(tmp_path: Path) -> None:
    images, labels = make_idx_folder(tmp_path / "idx")
    (tmp_path / "idx" / ".train-images-hidden").write_bytes(b"junk")  # hidden files are never picked
    cfg = config_from({"data": {"name": "mnist_idx", "path": str(tmp_path / "idx"), "channels": 1, "image_size": 6}})
    raw = load_source(cfg.data)
    assert raw.images.shape == (42, 1, 6, 6)
    assert raw.images.dtype == np.uint8
    assert np.array_equal(raw.images[:, 0], images)  # train first, then t10k, same size: pixels unchanged
    assert raw.labels.dtype == np.int64
    assert np.array_equal(raw.labels, labels)
    assert raw.classes == ["0", "1", "2"]


def test_mnist_idx_source_resizes_and_converts(tmp_path: Path) -> None:
    make_idx_folder(tmp_path / "idx")
    cfg = config_from({"data": {"name": "mnist_idx", "path": str(tmp_path / "idx"), "channels": 3, "image_size": 8}})
    raw = load_source(cfg.data)
    assert raw.images.shape == (42, 3, 8, 8)
    assert np.array_equal(raw.images[:, 0], raw.images[:, 2])


def test_mnist_idx_source_errors(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    make_idx_folder(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))  # 12 images, 5 labels
    data = conf_section("data", name="mnist_idx", path=str(folder), image_size=6)
    with pytest.raises(DataError, match="t10k-labels"):
        load_source(data)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=re.escape(str(folder))):
        load_source(data)
    with pytest.raises(DataError, match="nowhere"):
        load_source(conf_section("data", name="mnist_idx", path=str(tmp_path / "nowhere")))


# --- image decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16])
def test_decode_image_shape(tmp_path: Path, channels: int, size: int) -> None:
    rng = np.random.default_rng(0)
    write_png(tmp_path / "rgb.png", rng.integers(0, 256, (20, 14, 3), dtype=np.uint8))
    write_png(tmp_path / "gray.png", rng.integers(0, 256, (9, 9), dtype=np.uint8))
    for name in ("rgb.png", "gray.png"):
        arr = decode_image(tmp_path / name, channels, size)
        assert arr.shape == (channels, size, size)
        assert arr.dtype == np.uint8


def test_decode_image_keeps_pixels_at_the_same_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_png(tmp_path / "rgb.png", rgb)
    assert np.array_equal(decode_image(tmp_path / "rgb.png", 3, 8), rgb.transpose(2, 0, 1))
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(decode_image(tmp_path / "rgb.png", 1, 8)[0], gray)
    write_png(tmp_path / "gray.png", gray)
    as_rgb = decode_image(tmp_path / "gray.png", 3, 8)
    assert all(np.array_equal(as_rgb[c], gray) for c in range(3))


def test_decode_image_composites_alpha_over_black(tmp_path: Path) -> None:
    rgba = np.full((8, 8, 4), 200, dtype=np.uint8)
    rgba[:4, :, 3] = 0  # top half fully transparent
    rgba[4:, :, 3] = 255
    write_png(tmp_path / "a.png", rgba, mode="RGBA")
    arr = decode_image(tmp_path / "a.png", 3, 8)
    assert (arr[:, :4] == 0).all()
    assert (arr[:, 4:] == 200).all()


def test_decode_image_scales_16_bit(tmp_path: Path) -> None:
    deep = np.linspace(1000, 60000, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    arr = decode_image(tmp_path / "deep.png", 1, 8)
    assert arr.dtype == np.uint8
    assert (arr.min(), arr.max()) == (0, 255)  # not clipped to 255 everywhere
    assert np.all(np.diff(arr.ravel().astype(int)) >= 0)  # order kept


def test_decode_image_applies_exif_orientation(tmp_path: Path) -> None:
    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, :8] = 255  # left half white
    img = Image.fromarray(wide)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: the left half ends up on top
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    arr = decode_image(tmp_path / "rotated.jpg", 1, 16)[0]
    assert arr[:6].min() > 200
    assert arr[10:].max() < 50


def test_decode_image_palette_transparency_and_bilevel(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(tmp_path / "clear.gif", transparency=1)  # white, but fully transparent
    assert decode_image(tmp_path / "clear.gif", 3, 8).max() == 0
    Image.fromarray(np.eye(8, dtype=bool)).save(tmp_path / "bits.png")
    arr = decode_image(tmp_path / "bits.png", 1, 8)[0]
    assert np.array_equal(arr, np.eye(8, dtype=np.uint8) * 255)


def test_decode_image_constant_16_bit_white_stays_white(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    assert decode_image(tmp_path / "white16.png", 1, 8).min() == 255


def test_decode_image_errors(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("text.png", "empty.jpg", "missing.png"):
        with pytest.raises(ImageDecodeError):
            decode_image(tmp_path / name, 1, 8)


def test_decode_image_refuses_decompression_bombs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png(tmp_path / "big.png", np.zeros((40, 40), dtype=np.uint8))
    write_png(tmp_path / "huge.png", np.zeros((60, 60), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name in ("big.png", "huge.png"):  # over the limit (Pillow warns), over twice the limit (Pillow raises)
        with pytest.raises(ImageDecodeError, match="Decompression"):
            decode_image(tmp_path / name, 1, 8)


# --- fit_images ---------------------------------------------------------------------------------


def test_fit_images_gray_to_rgb() -> None:
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    y = fit_images(x, 3, 8)
    assert y.shape == (4, 3, 8, 8)
    assert y.dtype == np.uint8
    assert all(np.array_equal(y[:, c], x[:, 0]) for c in range(3))


def test_fit_images_rgb_to_gray_matches_pillow() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    y = fit_images(x, 1, 8)
    assert y.shape == (3, 1, 8, 8)
    pil = np.stack([np.asarray(Image.fromarray(img.transpose(1, 2, 0)).convert("L")) for img in x])
    assert np.abs(y[:, 0].astype(int) - pil.astype(int)).max() <= 1


def test_fit_images_resize() -> None:
    x = np.full((2, 1, 8, 8), 77, dtype=np.uint8)
    x[1] = 200
    up, down = fit_images(x, 1, 16), fit_images(x, 1, 4)
    assert up.shape == (2, 1, 16, 16)
    assert down.shape == (2, 1, 4, 4)
    assert up.dtype == down.dtype == np.uint8
    assert (up[0] == 77).all() and (up[1] == 200).all()
    assert (down[0] == 77).all() and (down[1] == 200).all()


def test_fit_images_is_a_no_op_when_it_already_fits() -> None:
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 5), dtype=np.uint8)
    assert np.array_equal(fit_images(x, 3, 5), x)


# --- sources ------------------------------------------------------------------------------------


def test_digits_source() -> None:
    raw = load_digits_source(conf_section("data"))
    assert raw.images.shape == (1797, 1, 8, 8)
    assert raw.images.dtype == np.uint8
    assert raw.images.max() == 255
    assert raw.classes == [str(c) for c in range(10)]
    assert raw.labels.dtype == np.int64
    assert set(raw.labels.tolist()) == set(range(10))
    assert len(raw.labels) == 1797
    assert raw.skipped == [] and raw.ignored == 0
    assert re.fullmatch(r"[0-9a-f]{64}", raw.digest)


def test_digits_source_channels_and_size() -> None:
    raw = load_digits_source(conf_section("data", channels=3, image_size=16))
    assert raw.images.shape == (1797, 3, 16, 16)


def make_messy_folder(root: Path) -> Path:
    """Three good classes of 4 PNGs; class_0 gets every kind of odd file."""
    make_image_folder(root, classes=3, per_class=4, size=12)
    d = root / "class_0"
    rng = np.random.default_rng(0)
    png = (d / "img_0.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden.png").write_bytes(png)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(d / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), mode="RGBA").save(d / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert("P").save(d / "palette.gif")
    Image.fromarray(rng.integers(0, 65536, (12, 12), dtype=np.uint16)).save(d / "deep.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    (root / ".cache").mkdir()  # hidden folders are not classes
    write_png(root / ".cache" / "x.png", np.zeros((12, 12), dtype=np.uint8))
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_source_on_a_messy_folder(tmp_path: Path, channels: int) -> None:
    root = make_messy_folder(tmp_path / "images")
    assert Image.open(root / "class_0" / "deep.png").mode == "I;16"
    assert Image.open(root / "class_0" / "cmyk.jpg").mode == "CMYK"
    cfg = config_from({"data": {"name": "imagefolder", "path": str(root), "channels": channels, "image_size": 10}})
    raw = load_source(cfg.data)
    assert raw.classes == ["class_0", "class_1", "class_2"]
    # 4 PNGs + JPEG + RGBA + GIF + 16-bit + CMYK in class_0, 4 each elsewhere
    assert np.bincount(raw.labels).tolist() == [9, 4, 4]
    assert raw.images.shape == (17, channels, 10, 10)
    assert raw.images.dtype == np.uint8
    assert sorted(s["file"] for s in raw.skipped) == ["class_0/truncated.png", "class_0/zero.png"]
    assert all(s["reason"] for s in raw.skipped)
    assert raw.ignored == 2  # notes.txt, .hidden.png


def test_imagefolder_source_needs_two_usable_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "one", classes=1, per_class=4)
    (root / "broken").mkdir()
    (root / "broken" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(str(root))):
        load_source(conf_section("data", name="imagefolder", path=str(root)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=re.escape(str(empty))):
        load_source(conf_section("data", name="imagefolder", path=str(empty)))
    with pytest.raises(DataError, match="absent"):
        load_source(conf_section("data", name="imagefolder", path=str(tmp_path / "absent")))


def test_imagefolder_source_drops_a_class_with_no_usable_image(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    (root / "class_x").mkdir()
    (root / "class_x" / "a.png").write_bytes(b"junk")
    raw = load_source(conf_section("data", name="imagefolder", path=str(root), channels=1, image_size=12))
    assert raw.classes == ["class_0", "class_1"]
    assert set(raw.labels.tolist()) == {0, 1}
    assert [s["file"] for s in raw.skipped] == ["class_x/a.png"]


def test_imagefolder_source_reads_nested_folders(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    write_png(root / "class_1" / "sub" / "deeper.png", np.zeros((12, 12), dtype=np.uint8))
    raw = load_source(conf_section("data", name="imagefolder", path=str(root), channels=1, image_size=12))
    assert np.bincount(raw.labels).tolist() == [3, 4]


# --- prepare + store ----------------------------------------------------------------------------

META_KEYS = {"classes", "counts", "image_shape", "mean", "std", "source_digest", "skipped"}


def check_prepared(out: Path, meta: dict, n: int) -> dict[str, Split]:
    assert {p.name for p in out.iterdir()} == {"train.npz", "val.npz", "test.npz", "meta.json"}
    assert json.loads((out / "meta.json").read_text()) == meta == load_meta(out)
    assert set(meta) >= META_KEYS
    splits = {}
    for name in SPLITS:
        with np.load(out / f"{name}.npz", allow_pickle=False) as npz:
            assert set(npz.files) == {"images", "labels"}
            split = Split(npz["images"], npz["labels"])
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert list(split.images.shape[1:]) == meta["image_shape"]
        assert meta["counts"][name]["total"] == len(split.labels)
        assert meta["counts"][name]["per_class"] == np.bincount(split.labels, minlength=len(meta["classes"])).tolist()
        assert all(x > 0 for x in meta["counts"][name]["per_class"])
        splits[name] = split
    assert sum(len(s.labels) for s in splits.values()) == n
    assert len(meta["mean"]) == len(meta["std"]) == meta["image_shape"][0]
    train = splits["train"].images.astype(np.float64) / 255
    assert meta["mean"] == pytest.approx(train.mean(axis=(0, 2, 3)).tolist(), abs=1e-5)
    assert meta["std"] == pytest.approx(train.std(axis=(0, 2, 3)).tolist(), abs=1e-5)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["source_digest"])
    return splits


def test_prepare_splits_imagefolder(tmp_path: Path) -> None:
    root = make_messy_folder(tmp_path / "images")
    cfg = config_from(
        {
            "seed": 1,
            "data": {
                "name": "imagefolder",
                "path": str(root),
                "channels": 3,
                "image_size": 10,
                "split": {"train": 0.5, "val": 0.25, "test": 0.25},
            },
        }
    )
    out = tmp_path / "prepared"
    meta = prepare_splits(cfg, out)
    check_prepared(out, meta, 17)
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["image_shape"] == [3, 10, 10]
    assert sorted(s["file"] for s in meta["skipped"]) == ["class_0/truncated.png", "class_0/zero.png"]
    # the same data again gives the same digest and the same files; the folder is replaced atomically
    again = prepare_splits(cfg, out)
    assert again["source_digest"] == meta["source_digest"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_splits_digits(tmp_path: Path) -> None:
    cfg = load_config(["data.split.train=0.8", "data.split.test=0.1"], root=ROOT)
    meta = prepare_splits(cfg, tmp_path / "prepared")
    splits = check_prepared(tmp_path / "prepared", meta, 1797)
    assert meta["classes"] == [str(c) for c in range(10)]
    assert meta["image_shape"] == [1, 8, 8]
    assert meta["skipped"] == []
    assert len(splits["train"].labels) == pytest.approx(0.8 * 1797, abs=10)
    assert meta["source_digest"] == load_digits_source(cfg.data).digest


def test_prepare_splits_digest_tracks_the_data(tmp_path: Path) -> None:
    cfg = config_from({"data": {"name": "imagefolder", "path": str(tmp_path / "a"), "image_size": 12}})
    make_image_folder(tmp_path / "a", classes=2, per_class=4, seed=0)
    first = prepare_splits(cfg, tmp_path / "p")["source_digest"]
    make_image_folder(tmp_path / "a", classes=2, per_class=4, seed=1)
    assert prepare_splits(cfg, tmp_path / "p")["source_digest"] != first


def test_save_and_load_split_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 3, 5, 5), dtype=np.uint8)
    labels = rng.integers(0, 4, 7).astype(np.int32)
    save_split(tmp_path / "s.npz", Split(images, labels))
    got = load_split(tmp_path / "s.npz")
    assert np.array_equal(got.images, images) and got.images.dtype == np.uint8
    assert np.array_equal(got.labels, labels) and got.labels.dtype == np.int64
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert npz["images"].dtype != object and npz["labels"].dtype != object


def test_save_split_writes_a_selection_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 2 images (CHUNK_BYTES shrunk to 2 images' bytes): an index selection written from a memory
    map reads back (whole and memory-mapped) as the fancy-indexed arrays, as np.savez would have stored them."""
    from cnnpipe.data import store

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (9, 3, 5, 5), dtype=np.uint8)
    labels = rng.integers(0, 4, 9)
    save_split(tmp_path / "all.npz", Split(images, labels))
    mapped = load_split(tmp_path / "all.npz", mmap=True)
    monkeypatch.setattr(store, "CHUNK_BYTES", 2 * 3 * 5 * 5)
    index = np.array([8, 0, 3, 3, 5, 1, 7])  # 7 rows: chunks of 2, 2, 2, 1
    save_split(tmp_path / "sel.npz", mapped, index=index)
    for got in (load_split(tmp_path / "sel.npz"), load_split(tmp_path / "sel.npz", mmap=True)):
        assert np.array_equal(got.images, images[index]) and np.array_equal(got.labels, labels[index])
    np.savez(tmp_path / "ref.npz", images=images[index], labels=labels[index].astype(np.int64))
    with np.load(tmp_path / "sel.npz") as ours, np.load(tmp_path / "ref.npz") as ref:
        assert sorted(ours.files) == sorted(ref.files)
        assert all(ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape for k in ref.files)
    save_split(tmp_path / "empty.npz", Split(images, labels), index=np.array([], dtype=np.int64))
    assert load_split(tmp_path / "empty.npz").images.shape == (0, 3, 5, 5)


def test_channel_stats_equal_numpy_on_the_selection() -> None:
    from cnnpipe.data import prepare
    from cnnpipe.data.prepare import channel_stats

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (50, 3, 6, 6), dtype=np.uint8)
    index = rng.permutation(50)[:31]
    x = images[index].astype(np.float64) / 255.0
    mean, std = channel_stats(images, index)
    assert mean == pytest.approx(x.mean(axis=(0, 2, 3)), abs=1e-6)
    assert std == pytest.approx(x.std(axis=(0, 2, 3)), abs=1e-6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "STATS_CHUNK_VALUES", 4 * 3 * 6 * 6)  # chunks of 4 images: the same numbers
        assert channel_stats(images, index) == (mean, std)


def test_load_split_refuses_pickles_and_garbage(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=np.array([{"a": 1}], dtype=object), labels=np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError, match=re.escape(str(pickled))):
        load_split(pickled)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"hello")
    with pytest.raises(DataError, match=re.escape(str(garbage))):
        load_split(garbage)
    wrong_keys = tmp_path / "wrong.npz"
    np.savez(wrong_keys, x=np.zeros(2))
    with pytest.raises(DataError, match=re.escape(str(wrong_keys))):
        load_split(wrong_keys)
    with pytest.raises(DataError, match="missing"):
        load_split(tmp_path / "nope.npz")
    with pytest.raises(DataError, match=re.escape("meta.json")):
        load_meta(tmp_path)


def test_load_split_memory_maps_the_images(tmp_path: Path) -> None:
    images = np.arange(5 * 3 * 4 * 4, dtype=np.uint8).reshape(5, 3, 4, 4)
    save_split(tmp_path / "s.npz", Split(images, np.arange(5)))
    split = load_split(tmp_path / "s.npz", mmap=True)
    assert isinstance(split.images, np.memmap) and not split.images.flags.writeable
    assert split.source == tmp_path / "s.npz"
    assert np.array_equal(split.images, images) and split.labels.tolist() == list(range(5))
    np.savez_compressed(tmp_path / "c.npz", images=images, labels=np.arange(5))
    with pytest.raises(DataError, match=r"c\.npz.*compressed"):
        load_split(tmp_path / "c.npz", mmap=True)
    assert np.array_equal(load_split(tmp_path / "c.npz").images, images)  # read whole, it is fine
