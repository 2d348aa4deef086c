"""Unit tests of resumable training's folder logic (cnnpipe.training.resume): real checkpoint files written with
torch.save in Lightning's layout, real flocks, no training. A folder "held by another process" is held here by
a second open file description on its .lock: flock conflicts between those as between processes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cnnpipe.config import Config, load_config
from cnnpipe.training import resume
from cnnpipe.training.resume import (
    BEST,
    HISTORY,
    LAST,
    LOCK,
    STATE,
    WEIGHTS,
    Damaged,
    HistoryFile,
    checkpoint_epoch,
    config_digest,
    discard_stale_checkpoints,
    find_resumable,
    finish_checkpoints,
    outputs_dir,
    set_aside,
    start_checkpoints,
)
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

DAMAGED_NAME = r"\.damaged-\d{8}T\d{6}Z"


@pytest.fixture(autouse=True)
def _release_claims(tmp_path: Path) -> Iterator[None]:
    """Folders this process claimed under tmp_path are released after the test (the claims are module state)."""
    yield
    for folder in [f for f in resume._claims if f.is_relative_to(tmp_path)]:
        resume._release(folder)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(["augment=none", "train.resume=auto"], root=ROOT)


def save_ckpt(path: Path, epoch: int, mtime_s: int | None = None) -> Path:
    """A checkpoint as Lightning writes it (the keys find_resumable reads: epoch, state_dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "epoch": epoch,
            "global_step": 10 * (epoch + 1),
            "pytorch-lightning_version": "2.5.0",
            "state_dict": {"net.weight": torch.full((2, 2), float(epoch))},
            "optimizer_states": [],
            "lr_schedulers": [],
        },
        path,
    )
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


def run_folder(
    root: Path, cfg: Config, run_id: str, last: int | None = None, best: int | None = None, mtime_s: int = 1_000
) -> Path:
    """`<root>/<run_id>/` as a training leaves it: state.json, history.json (epochs 1-6), checkpoints."""
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / STATE).write_text(json.dumps({"run_id": run_id, "config_digest": config_digest(cfg)}))
    (folder / HISTORY).write_text(json.dumps([{"epoch": e, "val/acc": e / 10} for e in range(1, 7)]))
    if best is not None:
        save_ckpt(folder / WEIGHTS / BEST, best, mtime_s)
    if last is not None:
        save_ckpt(folder / WEIGHTS / LAST, last, mtime_s)
    return folder


def hold(folder: Path) -> int:
    """Hold the folder's lock as another process would; returns the descriptor to close."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def is_free(folder: Path) -> bool:
    """Nobody holds the folder's lock (taken and released at once to find out)."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_config_digest_ignores_tracking_and_resume_only(cfg: Config) -> None:
    digest = config_digest(cfg)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    same = load_config(["augment=none", "train.resume=never", "tracking.uri=sqlite:///other.db"], root=ROOT)
    assert config_digest(same) == digest
    assert config_digest(load_config(["augment=none", "train.resume=auto", "optim.lr=0.5"], root=ROOT)) != digest
    assert config_digest(load_config(["augment=none", "train.resume=auto", "seed=1"], root=ROOT)) != digest


def test_nothing_is_resumed_with_resume_never_or_without_a_checkpoint_folder(cfg: Config, tmp_path: Path) -> None:
    run_folder(tmp_path / "ckpt", cfg, "r1", last=2)
    never = load_config(["augment=none", "train.resume=never"], root=ROOT)
    assert find_resumable(never, tmp_path / "ckpt") is None
    assert find_resumable(cfg, tmp_path / "missing") is None
    assert is_free(tmp_path / "ckpt" / "r1")  # not claimed by a refusal


def test_the_newest_folder_with_the_same_config_is_resumed_from_last_ckpt(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    run_folder(root, cfg, "older", last=1, mtime_s=1_000)
    newest = run_folder(root, cfg, "newest", last=2, best=1, mtime_s=3_000)
    other = load_config(["augment=none", "train.resume=auto", "optim.lr=0.5"], root=ROOT)
    run_folder(root, other, "other-config", last=4, mtime_s=9_000)  # newer, but another config: refused
    run_folder(root, cfg, "no-checkpoint")  # killed before its first checkpoint: nothing to resume
    (root / "garbage-state").mkdir()
    (root / "garbage-state" / STATE).write_text("{not json")
    save_ckpt(root / "garbage-state" / WEIGHTS / LAST, 5, 9_500)
    no_id = run_folder(root, cfg, "no-run-id", last=5, mtime_s=9_900)
    (no_id / STATE).write_text(json.dumps({"config_digest": config_digest(cfg)}))

    found = find_resumable(cfg, root)
    assert found is not None
    assert (found.run_id, found.folder, found.checkpoint) == ("newest", newest, newest / WEIGHTS / LAST)
    assert found.last_checkpoint == found.checkpoint
    assert [r["epoch"] for r in found.history] == [1, 2, 3]  # last.ckpt saved after epoch index 2
    assert not is_free(newest)  # held until finish_checkpoints
    assert is_free(root / "older")


def test_a_folder_removed_while_resume_looks_is_skipped(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run finishes and removes its folder between the listing and the stat of its checkpoint."""
    root = tmp_path / "ckpt"
    older = run_folder(root, cfg, "older", last=1, mtime_s=1_000)
    finishing = run_folder(root, cfg, "finishing", last=2, mtime_s=3_000)
    real_stat, calls = Path.stat, []

    def stat_after_removal(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        if self.parent.parent == finishing and self.name == LAST:
            calls.append(self)
            if len(calls) > 1:  # is_file() saw it; by the time its mtime is read, it is gone
                raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat_after_removal)
    found = find_resumable(cfg, root)
    monkeypatch.undo()
    assert len(calls) == 2  # the race happened: listed, then gone
    assert found is not None and (found.run_id, found.folder) == ("older", older)


def test_a_folder_held_by_a_live_process_is_skipped(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    run_folder(root, cfg, "older", last=1, mtime_s=1_000)
    busy = run_folder(root, cfg, "busy", last=3, mtime_s=5_000)
    fd = hold(busy)
    try:
        found = find_resumable(cfg, root)
        assert found is not None and found.run_id == "older"
    finally:
        os.close(fd)
    assert (busy / WEIGHTS / LAST).is_file()  # untouched


def test_a_damaged_last_ckpt_is_set_aside_and_best_ckpt_is_resumed(
    cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "ckpt"
    folder = run_folder(root, cfg, "r1", last=4, best=1)
    last = folder / WEIGHTS / LAST
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])  # a full disk's truncated file
    damaged: list[Damaged] = []
    found = find_resumable(cfg, root, damaged=damaged)
    assert found is not None and found.checkpoint == folder / WEIGHTS / BEST
    assert [r["epoch"] for r in found.history] == [1, 2]  # only the rows up to best.ckpt's epoch
    assert not last.exists()
    [aside] = list((folder / WEIGHTS).glob(f"{LAST}.damaged-*"))
    assert re.fullmatch(re.escape(LAST) + DAMAGED_NAME, aside.name)
    assert aside.read_bytes() == good[: len(good) // 2]  # renamed, not deleted or rewritten
    assert damaged == [Damaged("r1", last, aside)]
    lines = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(lines) == 1 and lines[0].startswith("[train] warning: ") and aside.name in lines[0]


def test_with_both_checkpoints_damaged_the_next_older_folder_is_resumed(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    older = run_folder(root, cfg, "older", last=0, mtime_s=1_000)
    newest = run_folder(root, cfg, "newest", last=3, best=2, mtime_s=5_000)
    (newest / WEIGHTS / LAST).write_bytes(b"")
    torch.save({"weights": torch.zeros(1)}, newest / WEIGHTS / BEST)  # loads, but no state_dict
    os.utime(newest / WEIGHTS / BEST, ns=(5_000 * 10**9,) * 2)
    damaged: list[Damaged] = []
    found = find_resumable(cfg, root, damaged=damaged)
    assert found is not None and (found.run_id, found.checkpoint) == ("older", older / WEIGHTS / LAST)
    assert [(d.run_id, d.checkpoint.name) for d in damaged] == [("newest", LAST), ("newest", BEST)]
    assert all(d.set_aside.is_file() and not d.checkpoint.exists() for d in damaged)
    assert is_free(newest) and not is_free(older)  # the damaged folder is let go, the resumed one held


def test_with_every_checkpoint_damaged_nothing_is_resumed_and_nothing_is_deleted(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    folder = run_folder(root, cfg, "r1", last=1)
    (folder / WEIGHTS / LAST).write_bytes(b"\x00garbage" * 8)
    damaged: list[Damaged] = []
    assert find_resumable(cfg, root, damaged=damaged) is None
    assert len(damaged) == 1 and damaged[0].set_aside.read_bytes() == b"\x00garbage" * 8
    assert (folder / STATE).is_file() and is_free(folder)
    assert find_resumable(cfg, root) is None  # the set-aside file is not a candidate


def test_without_claim_rank_0s_choice_is_returned_unchecked_and_unheld(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    folder = run_folder(root, cfg, "r1", last=1, best=0)
    (folder / WEIGHTS / LAST).write_bytes(b"not loaded by ranks > 0")
    fd = hold(folder)  # rank 0 holds it
    try:
        found = find_resumable(cfg, root, claim=False)
    finally:
        os.close(fd)
    assert found is not None and found.checkpoint == folder / WEIGHTS / LAST
    assert [r["epoch"] for r in found.history] == [1, 2, 3, 4, 5, 6]  # no epoch to cut at
    assert (folder / WEIGHTS / LAST).read_bytes() == b"not loaded by ranks > 0"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", r"cannot be loaded: \w+"),
        (b"\x00garbage", r"cannot be loaded: \w+"),
        ({"epoch": 1}, r"not a Lightning checkpoint"),
        ([1, 2, 3], r"not a Lightning checkpoint"),
        ({"state_dict": {}, "when": time.gmtime(0)}, r"cannot be loaded: UnpicklingError"),  # not weights_only
    ],
)
def test_checkpoint_epoch_says_why_a_file_cannot_be_resumed(tmp_path: Path, content: object, why: str) -> None:
    path = tmp_path / "x.ckpt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    epoch, reason = checkpoint_epoch(path)
    assert epoch is None and re.match(why, reason), reason
    assert "\n" not in reason  # one warning line


def test_checkpoint_epoch_reads_the_epoch_or_minus_one(tmp_path: Path) -> None:
    assert checkpoint_epoch(save_ckpt(tmp_path / "a.ckpt", 7)) == (7, "")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "b.ckpt")
    assert checkpoint_epoch(tmp_path / "b.ckpt") == (-1, "")


def test_set_aside_never_overwrites_an_earlier_damaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / LAST
    frozen = time.gmtime(1_700_000_000)  # the clock stands still: a loaded machine cannot move to the next second
    monkeypatch.setattr(time, "gmtime", lambda *args: frozen)
    stamps = {time.strftime("%Y%m%dT%H%M%SZ", frozen)}
    for stamp in stamps:  # earlier set-asides with this second's name
        (tmp_path / f"{LAST}.damaged-{stamp}").write_text("first")
        (tmp_path / f"{LAST}.damaged-{stamp}~1").write_text("second")
    path.write_text("third")
    aside = set_aside(path)
    assert re.fullmatch(re.escape(LAST) + DAMAGED_NAME + "~2", aside.name), aside.name
    assert aside.read_text() == "third" and not path.exists()
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == sorted(["first", "second"] * len(stamps) + ["third"])


def test_start_checkpoints_holds_a_new_folder_with_its_state(cfg: Config, tmp_path: Path) -> None:
    folder = start_checkpoints(cfg, tmp_path / "ckpt", "run-1")
    assert folder == tmp_path / "ckpt" / "run-1"
    assert json.loads((folder / STATE).read_text()) == {"run_id": "run-1", "config_digest": config_digest(cfg)}
    assert not is_free(folder)
    assert outputs_dir(folder) == folder / "outputs" and (folder / "outputs").is_dir()


def test_discard_stale_checkpoints_removes_only_dead_runs_without_a_checkpoint(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    run_folder(root, cfg, "stale")  # killed before its first checkpoint
    run_folder(root, cfg, "resumable", best=1)
    with_damaged = run_folder(root, cfg, "damaged-only")
    (with_damaged / WEIGHTS).mkdir()
    (with_damaged / WEIGHTS / f"{LAST}.damaged-20250101T000000Z").write_bytes(b"x")
    live = run_folder(root, cfg, "live")
    mine = start_checkpoints(cfg, root, "mine")  # this process's own run, no checkpoint yet
    (root / "not-ours").mkdir()  # no state.json: not a folder this project made
    fd = hold(live)
    try:
        assert discard_stale_checkpoints(root) == ["stale"]
    finally:
        os.close(fd)
    assert sorted(p.name for p in root.iterdir()) == ["damaged-only", "live", "mine", "not-ours", "resumable"]
    assert not is_free(mine)  # still held by this process
    assert discard_stale_checkpoints(tmp_path / "missing") == []


def test_finish_checkpoints_removes_the_folder_unless_a_damaged_file_must_stay(cfg: Config, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    clean = start_checkpoints(cfg, root, "clean")
    save_ckpt(clean / WEIGHTS / LAST, 1)
    outputs_dir(clean)
    finish_checkpoints(clean)
    assert not clean.exists()

    kept = start_checkpoints(cfg, root, "kept")
    save_ckpt(kept / WEIGHTS / BEST, 1)
    save_ckpt(kept / WEIGHTS / LAST, 2)
    (kept / WEIGHTS / "sub").mkdir()
    aside = set_aside(kept / WEIGHTS / LAST)
    HistoryFile(kept)({"val/acc": 0.5}, 1)
    (outputs_dir(kept) / "model.json").write_text("{}")
    finish_checkpoints(kept)
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == [WEIGHTS, f"{WEIGHTS}/{aside.name}"]
    assert kept not in resume._claims


def test_history_file_keeps_one_row_per_epoch_and_a_rerun_epoch_replaces_the_rest(tmp_path: Path) -> None:
    history = HistoryFile(tmp_path, [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.8}, {"epoch": 3, "loss": 0.7}])
    history({"loss": 0.75}, 2)  # resumed from the checkpoint after epoch 1: epoch 2 runs again
    expected = [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.75}]
    assert history.rows == expected and json.loads((tmp_path / HISTORY).read_text()) == expected
    history({"loss": 0.6}, 3)
    assert [r["epoch"] for r in json.loads((tmp_path / HISTORY).read_text())] == [1, 2, 3]
