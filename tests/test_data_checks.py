"""prepare's data checks (cnnpipe.data.checks): duplicates planted across the splits are found (exact copies,
resized and re-encoded ones), distinct images are not flagged, data.dedupe removes what it says from val/test only,
the class counts, imbalance warning and source summary say what the folder holds."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pytest
from PIL import Image

from cnnpipe.config import Config
from cnnpipe.data import checks
from cnnpipe.data.checks import IMBALANCE_RATIO, perceptual_hashes
from cnnpipe.data.sources import load_source
from cnnpipe.data.split import SPLITS, stratified_split
from cnnpipe.data.store import load_split
from cnnpipe.errors import DataError
from cnnpipe.stages.prepare import prepare_splits
from tests.tiny import config_from

SIZE = 40  # stored side: above the 32 x 32 phash looks at, so the near check runs (and resizes)
CLASSES = ("cat", "dog", "eel")
DISTINCT = 8  # distinct photos per class
FAMILIES = 2  # of those, how many get planted copies (each: an exact copy, a 1.5x PNG, a JPEG at quality 70)
COPIES = ("copy", "resized", "q70")


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3): random colour grids of 2..16 cells upscaled and summed with halving amplitudes (a
    photo's falling spectrum): distinct draws are far apart in phash, unlike noise or flat colour."""
    out = np.zeros((height, width, 3), dtype=np.float32)
    for octave, cells in enumerate((2, 4, 8, 16)):
        grid = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        planes = [Image.fromarray(grid[..., c]).resize((width, height), Image.Resampling.BICUBIC) for c in range(3)]
        out += np.stack([np.asarray(p) for p in planes], axis=-1) * 0.6**octave
    return np.clip(128 + out * (55 / out.std()), 0, 255).astype(np.uint8)


def planted_folder(root: Path, seed: int = 0) -> dict[str, list[str]]:
    """DISTINCT photos a class (sizes 40..60, non-square), FAMILIES of them with planted copies; plus one grey (L)
    and one RGBA photo in the first class. Returns each family: [original, copy, resized, q70] (relative paths)."""
    rng = np.random.default_rng(seed)
    families: dict[str, list[str]] = {}
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(DISTINCT):
            width, height = (int(v) for v in rng.integers(40, 61, 2))
            pixels = photo(rng, width, height)
            original = root / name / f"{i:02d}.png"
            Image.fromarray(pixels).save(original)
            if i < FAMILIES:
                stem = f"{name}/{i:02d}"
                (root / f"{stem}_copy.png").write_bytes(original.read_bytes())
                Image.fromarray(pixels).resize((width * 3 // 2, height * 3 // 2), Image.Resampling.BICUBIC).save(
                    root / f"{stem}_resized.png"
                )
                Image.fromarray(pixels).save(root / f"{stem}_q70.jpg", quality=70)
                families[stem] = [f"{stem}.png", f"{stem}_copy.png", f"{stem}_resized.png", f"{stem}_q70.jpg"]
    Image.fromarray(photo(rng, 50, 44)[..., 0], mode="L").save(root / "cat" / "grey.png")
    rgba = np.dstack([photo(rng, 44, 52), np.full((52, 44), 255, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(root / "cat" / "alpha.png")
    return families


def folder_config(root: Path, **data: Any) -> Config:
    return config_from(
        {
            "seed": 3,
            "data": {
                "name": "imagefolder",
                "path": str(root),
                "channels": 3,
                "image_size": SIZE,
                "split": {"train": 0.5, "val": 0.25, "test": 0.25},
                **data,
            },
        }
    )


def placement(cfg: Config) -> dict[str, tuple[str, int]]:
    """Where each file lands (split, index in it) with dedupe off, worked out from the source and the seeded split
    alone (not from the checks)."""
    raw = load_source(cfg.data)
    splits = stratified_split(raw.labels, cfg.data.split, cfg.seed, raw.classes)
    assert raw.files is not None
    return {raw.files[row]: (s, k) for s in SPLITS for k, row in enumerate(splits[s])}


def listed_pairs(meta: dict[str, Any]) -> dict[frozenset[str], str]:
    """Every pair of files meta.json lists as duplicates -> "exact" or "near"."""
    dup = meta["checks"]["duplicates"]
    pairs = {
        frozenset((a["file"], b["file"])): "exact"
        for g in dup["exact"]["groups"]
        for a in g["members"]
        for b in g["members"]
        if a != b
    }
    pairs |= {frozenset((p["a"]["file"], p["b"]["file"])): "near" for p in dup["near"]["listed"]}
    return pairs


def earlier(a: str, b: str) -> bool:
    return SPLITS.index(a) < SPLITS.index(b)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("planted") / "photos"
    return root, planted_folder(root)


@pytest.fixture(scope="module")
def found(
    planted: tuple[Path, dict[str, list[str]]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, tuple[str, int]], Path]:
    root, _ = planted
    cfg = folder_config(root)
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    return prepare_splits(cfg, out), placement(cfg), out


def test_planted_duplicates_are_found_across_and_within_splits_and_nothing_else(
    planted: tuple[Path, dict[str, list[str]]], found: tuple[dict[str, Any], dict[str, tuple[str, int]], Path]
) -> None:
    _, families = planted
    meta, where, _ = found
    pairs = listed_pairs(meta)
    family_of = {f: stem for stem, files in families.items() for f in files}
    crossing = dict.fromkeys(COPIES, 0)
    for stem, (original, *copies) in families.items():
        for kind, copy in zip(COPIES, copies, strict=True):
            assert pairs.get(frozenset((original, copy))) == ("exact" if kind == "copy" else "near"), (stem, kind)
            crossing[kind] += where[original][0] != where[copy][0]
    assert all(crossing.values()), crossing  # the seeded split put some of each kind across splits
    for pair in pairs:  # no false positives: every listed pair is two members of one planted family
        a, b = sorted(pair)
        assert family_of.get(a) is not None and family_of.get(a) == family_of.get(b), pair
    # each member is named by where the split put it
    dup = meta["checks"]["duplicates"]
    members = [m for g in dup["exact"]["groups"] for m in g["members"]] + [
        m for p in dup["near"]["listed"] for m in (p["a"], p["b"])
    ]
    assert all((m["split"], m["index"]) == where[m["file"]] for m in members)
    # the counts per split pair agree with the lists (a few dozen pairs: all listed)
    for kind in ("exact", "near"):
        expected = dict.fromkeys(dup[kind]["pairs"], 0)
        for pair, k in pairs.items():
            if k == kind:
                a, b = sorted((where[f][0] for f in pair), key=SPLITS.index)
                expected[a if a == b else f"{a}-{b}"] += 1
        assert dup[kind]["pairs"] == expected
    assert dup["near"]["pairs_total"] == sum(dup["near"]["pairs"].values()) == len(dup["near"]["listed"])


def imagehash_of(image: np.ndarray) -> imagehash.ImageHash:
    """imagehash.phash of a stored (C, H, W) image as checks.py hashes it (grey, 32 x 32 by area), computed apart:
    HWC through fromarray (not the channel merge), imagehash's own DCT and median one image at a time."""
    grey = Image.fromarray(image.transpose(1, 2, 0)).convert("L").resize((32, 32), Image.Resampling.BOX)
    return imagehash.phash(grey)


def test_hashes_and_listed_bits_match_imagehash(
    planted: tuple[Path, dict[str, list[str]]], found: tuple[dict[str, Any], dict[str, tuple[str, int]], Path]
) -> None:
    root, _ = planted
    meta, _, out = found
    stored = {s: load_split(out / f"{s}.npz").images for s in SPLITS}
    train = stored["train"]
    ours = perceptual_hashes(train, np.arange(len(train)))
    assert ours.tolist() == [int(str(imagehash_of(image)), 16) for image in train]  # bit for bit
    near = meta["checks"]["duplicates"]["near"]["listed"]
    assert near
    for pair in near:
        a, b = (imagehash_of(stored[pair[k]["split"]][pair[k]["index"]]) for k in ("a", "b"))
        assert a - b == pair["bits"] <= meta["checks"]["duplicates"]["near"]["bits"]
    q70 = next(p for p in near if p["b"]["file"].endswith("_q70.jpg") or p["a"]["file"].endswith("_q70.jpg"))
    a, b = (imagehash.phash(Image.open(root / q70[k]["file"]).convert("RGB")) for k in ("a", "b"))
    assert a - b <= 8  # imagehash.phash on the files themselves (its LANCZOS): the copy is near the original there too


def test_source_summary_counts_modes_and_sizes(
    planted: tuple[Path, dict[str, list[str]]], found: tuple[dict[str, Any], dict[str, tuple[str, int]], Path]
) -> None:
    root, _ = planted
    meta, _, _ = found
    files = sorted(p for p in root.rglob("*") if p.is_file())
    sizes = np.array([Image.open(p).size for p in files])
    modes: dict[str, int] = {}
    for p in files:
        modes[Image.open(p).mode] = modes.get(Image.open(p).mode, 0) + 1
    src = meta["checks"]["source"]
    assert src["modes"] == modes and modes["L"] == 1 and modes["RGBA"] == 1
    assert src["kind"] == "files" and src["images"] == len(files)
    assert src["width"] == {"min": sizes[:, 0].min(), "median": np.median(sizes[:, 0]), "max": sizes[:, 0].max()}
    assert src["height"]["max"] == sizes[:, 1].max() and src["distinct_sizes"] == len({tuple(s) for s in sizes})
    per_class = meta["checks"]["class_counts"]
    assert [list(per_class[s].values()) for s in SPLITS] == [meta["counts"][s]["per_class"] for s in SPLITS]
    assert meta["checks"]["removed"]["counts"] == dict.fromkeys(SPLITS, 0)


@pytest.mark.parametrize("dedupe", ["exact", "near"])
def test_dedupe_removes_later_split_duplicates_from_val_and_test_only(
    planted: tuple[Path, dict[str, list[str]]],
    found: tuple[dict[str, Any], dict[str, tuple[str, int]], Path],
    tmp_path: Path,
    dedupe: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _ = planted
    listed, where, _ = found
    kinds = {"exact"} if dedupe == "exact" else {"exact", "near"}
    expected = set()
    for pair, kind in listed_pairs(listed).items():
        a, b = sorted(pair, key=lambda f: SPLITS.index(where[f][0]))
        if kind in kinds and earlier(where[a][0], where[b][0]):
            expected.add(b)
    assert expected and all(where[f][0] != "train" for f in expected)
    meta = prepare_splits(folder_config(root, dedupe=dedupe), tmp_path / "prepared")
    removed = meta["checks"]["removed"]
    assert {m["file"] for m in removed["images"]} == expected
    assert all(m["removed"] and m["index"] is None for m in removed["images"])
    if dedupe == "exact":  # exact removes byte copies and originals only, no resized or re-encoded image
        assert not any(f.endswith(("_resized.png", "_q70.jpg")) for f in expected)
    else:
        assert any(f.endswith(("_resized.png", "_q70.jpg")) for f in expected)
    for s in SPLITS:
        gone = sum(where[f][0] == s for f in expected)
        assert removed["counts"][s] == gone
        assert meta["counts"][s]["total"] == listed["counts"][s]["total"] - gone
        labels = load_split(tmp_path / "prepared" / f"{s}.npz").labels
        assert np.bincount(labels, minlength=3).tolist() == meta["counts"][s]["per_class"]
    # within-split duplicates stay (listed, never removed)
    assert (
        listed["checks"]["duplicates"]["exact"]["pairs"]["train"]
        + listed["checks"]["duplicates"]["near"]["pairs"]["train"]
    )
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "cross-split duplicate" in x)
    assert f"data.dedupe={dedupe} removed" in line and "checks.duplicates" in line


def test_dedupe_none_warns_in_one_line_and_keeps_everything(
    found: tuple[dict[str, Any], dict[str, tuple[str, int]], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    meta, where, out = found
    assert sum(meta["counts"][s]["total"] for s in SPLITS) == len(where)
    # the module fixture ran before capsys: run the report again on the written meta
    from cnnpipe.stages.prepare import report_checks

    report_checks(json.loads((out / "meta.json").read_text())["checks"], out / "meta.json")
    lines = [x for x in capsys.readouterr().err.splitlines() if "cross-split duplicate" in x]
    assert len(lines) == 1
    assert re.search(r"warning: \d+ cross-split duplicate pair\(s\) \(exact train-", lines[0])
    assert f"listed in {out / 'meta.json'} checks.duplicates; data.dedupe=exact|near drops them" in lines[0]


def test_a_removal_that_empties_a_class_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(photo(rng, 40, 40)).save(root / name / f"{i}.png")
    for i in range(1, 4):  # every eel is the same picture: val's and test's eel duplicate train's
        (root / "eel").mkdir(exist_ok=True)
        Image.fromarray(photo(np.random.default_rng(9), 40, 40)).save(root / "eel" / f"{i}.png")
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as err:
        prepare_splits(folder_config(root, dedupe="exact"), out)
    message = str(err.value)
    assert "\n" not in message and "data.dedupe=exact" in message and "class 'eel'" in message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    meta = prepare_splits(folder_config(root), out)  # dedupe off: found, listed, kept
    groups = meta["checks"]["duplicates"]["exact"]["groups"]
    assert [(g["size"], sorted(m["file"] for m in g["members"])) for g in groups] == [
        (3, ["eel/1.png", "eel/2.png", "eel/3.png"])
    ]


def imbalanced_folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(2)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(photo(rng, 36, 36)).save(root / name / f"{i}.png")
    return root


def test_imbalance_warns_when_the_largest_train_class_is_3x_the_smallest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = imbalanced_folder(tmp_path / "skewed", {"many": 16, "few": 4})
    meta = prepare_splits(folder_config(root), tmp_path / "p1")
    imb = meta["checks"]["imbalance"]
    assert imb["largest"] == {"class": "many", "count": 8} and imb["smallest"] == {"class": "few", "count": 2}
    assert imb["ratio"] == 4.0 >= IMBALANCE_RATIO
    lines = [x for x in capsys.readouterr().err.splitlines() if "imbalance" in x]
    assert len(lines) == 1 and "'many'" in lines[0] and "'few'" in lines[0] and "train.class_balance" in lines[0]
    root = imbalanced_folder(tmp_path / "even", {"many": 8, "few": 6})
    assert prepare_splits(folder_config(root), tmp_path / "p2")["checks"]["imbalance"]["ratio"] < IMBALANCE_RATIO
    assert "imbalance" not in capsys.readouterr().err


def test_near_check_is_skipped_and_said_for_images_smaller_than_phash_sees(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = imbalanced_folder(tmp_path / "small", {"a": 8, "b": 4})
    (root / "a" / "copy.png").write_bytes((root / "a" / "0.png").read_bytes())
    meta = prepare_splits(folder_config(root, image_size=16, dedupe="exact"), tmp_path / "p")
    near = meta["checks"]["duplicates"]["near"]
    assert near["checked"] is False and "16 px" in near["skipped"] and near["pairs_total"] == 0
    assert meta["checks"]["duplicates"]["exact"]["groups_total"] == 1  # exact duplicates are still found
    assert "near duplicates not looked for: images of 16 px" in capsys.readouterr().err
    # data.dedupe=near asked for what cannot be done here: refused in one line, before anything is written
    with pytest.raises(DataError, match=r"^data\.dedupe=near: images of 16 px .* set data\.dedupe=exact"):
        prepare_splits(folder_config(root, image_size=16, dedupe="near"), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_lists_are_bounded_cross_split_first_and_the_counts_stay_whole(
    planted: tuple[Path, dict[str, list[str]]],
    found: tuple[dict[str, Any], dict[str, tuple[str, int]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, _ = planted
    whole = found[0]["checks"]["duplicates"]
    monkeypatch.setattr(checks, "MAX_LISTED", 3)
    monkeypatch.setattr(checks, "MAX_GROUP_LISTED", 1)
    dup = prepare_splits(folder_config(root), tmp_path / "p")["checks"]["duplicates"]
    assert dup["near"]["pairs"] == whole["near"]["pairs"] and dup["near"]["pairs_total"] > 3
    assert dup["exact"]["groups_total"] == whole["exact"]["groups_total"] > 3
    assert len(dup["near"]["listed"]) == len(dup["exact"]["groups"]) == 3
    assert all(p["a"]["split"] != p["b"]["split"] for p in dup["near"]["listed"])  # cross-split pairs come first
    assert all(g["size"] == 2 and len(g["members"]) == 1 for g in dup["exact"]["groups"])


def test_identical_images_under_different_classes_are_a_warning_and_listed_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = imbalanced_folder(tmp_path / "labels", {"cat": 6, "dog": 6})
    (root / "cat" / "copy.png").write_bytes((root / "cat" / "1.png").read_bytes())  # a copy, same class
    (root / "dog" / "mislabelled.png").write_bytes((root / "cat" / "0.png").read_bytes())  # the same image, as a dog
    meta = prepare_splits(folder_config(root), tmp_path / "p")
    exact = meta["checks"]["duplicates"]["exact"]
    assert exact["groups_total"] == 2 and exact["conflicting_classes_total"] == 1
    first, second = exact["groups"]
    assert first["classes"] == ["cat", "dog"] and second["classes"] == ["cat"]
    assert {m["file"] for m in first["members"]} == {"cat/0.png", "dog/mislabelled.png"}
    lines = [x for x in capsys.readouterr().err.splitlines() if "different classes" in x]
    assert len(lines) == 1 and lines[0].startswith("[prepare] warning: 1 group(s) of identical images")
