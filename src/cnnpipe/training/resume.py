"""Resumable training: each run checkpoints into `checkpoints/<mlflow run id>/`; an interrupted run leaves
its folder behind, and `train.resume=auto` picks it up again when the config is the same.

The process training in a folder holds an flock on its `.lock` file until the run ends, so the kernel itself
says whether a folder's owner is alive (a SIGKILL or the OOM killer releases it): a live run's folder is
never resumed by a second process nor cleaned up, a dead one's is."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.atomic import write_json_atomic
from cnnpipe.config import Config, as_dict
from cnnpipe.console import warn

try:
    import fcntl
except ImportError:  # not POSIX: no claims (every folder looks free, as before)
    fcntl = None  # type: ignore[assignment]

STATE = "state.json"
WEIGHTS = "lightning"  # Lightning's own checkpoint folder inside a run's folder
LAST = "last.ckpt"
BEST = "best.ckpt"
HISTORY = "history.json"
LOCK = ".lock"  # flock-ed by the process training in the folder
OUTPUTS = "outputs"  # the run's models/ files, staged here before they are published
DAMAGED = ".damaged-"  # a checkpoint that cannot be loaded is renamed <name>.damaged-<time>, never deleted

_claims: dict[Path, int] = {}  # folder -> the open .lock file holding its flock in this process


def config_digest(cfg: Config) -> str:
    """What must match for a checkpoint to be resumed: the effective config minus tracking and resume."""
    tree = as_dict(cfg)
    tree.pop("tracking", None)
    tree["train"].pop("resume", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Resumable:
    run_id: str
    folder: Path
    history: list[dict[str, float]]
    checkpoint: Path  # last.ckpt, or best.ckpt when last.ckpt was damaged

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint


@dataclass
class Damaged:
    run_id: str
    checkpoint: Path  # where it was
    set_aside: Path  # where it is now


def find_resumable(
    cfg: Config, ckpt_root: Path, claim: bool = True, damaged: list[Damaged] | None = None
) -> Resumable | None:
    """The newest interrupted run with the same config and a checkpoint, if `train.resume=auto`.

    `claim` (the process that will train, rank 0): folders a live process holds are skipped; the checkpoint must
    load (`torch.load(weights_only=True)`), else it is renamed `<name>.damaged-<time>` with one warning line and
    appended to `damaged`, and the folder's best.ckpt, then older folders, are tried; the folder returned stays
    held by this process until `finish_checkpoints`. Without `claim` (DDP ranks > 0): rank 0's choice, unchecked."""
    if cfg.train.resume != "auto" or not ckpt_root.is_dir():
        return None
    digest = config_digest(cfg)
    candidates: list[tuple[int, Path, str]] = []
    for state_file in ckpt_root.glob(f"*/{STATE}"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        files = [p for p in (state_file.parent / WEIGHTS / n for n in (LAST, BEST)) if p.is_file()]
        if state.get("config_digest") == digest and files and state.get("run_id"):
            try:
                newest = max(p.stat().st_mtime_ns for p in files)
            except FileNotFoundError:  # another run finished and removed its folder meanwhile
                continue
            candidates.append((newest, state_file.parent, str(state["run_id"])))
    for _, folder, run_id in sorted(candidates, reverse=True):
        if not claim:
            found = next((p for p in (folder / WEIGHTS / n for n in (LAST, BEST)) if p.is_file()), None)
            if found is not None:
                return Resumable(run_id, folder, _history(folder, None), found)
            continue
        if not _claim(folder):
            continue  # another training is running in it right now
        for name in (LAST, BEST):
            path = folder / WEIGHTS / name
            if not path.is_file():
                continue
            epoch, why = checkpoint_epoch(path)
            if epoch is not None:
                return Resumable(run_id, folder, _history(folder, epoch), path)
            aside = set_aside(path)
            warn("train", f"{path}: damaged checkpoint ({why}); set aside as {aside.name}")
            if damaged is not None:
                damaged.append(Damaged(run_id, path, aside))
        _release(folder)
    return None


def checkpoint_epoch(path: Path) -> tuple[int | None, str]:
    """The epoch a Lightning checkpoint was saved after, or None and why it cannot be loaded (a truncated file
    from a full disk, garbage): the same `weights_only` load that the resume will do."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"cannot be loaded: {type(exc).__name__}{': ' + first[:120] if first else ''}"
    if not isinstance(state, dict) or "state_dict" not in state:
        return None, "not a Lightning checkpoint"
    return int(state.get("epoch", -1)), ""


def set_aside(path: Path) -> Path:
    """Rename `path` to `<name>.damaged-<UTC time>` beside it (kept for the user to inspect, never deleted)."""
    aside = path.with_name(f"{path.name}{DAMAGED}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
    os.replace(path, aside)
    return aside


def discard_stale_checkpoints(ckpt_root: Path) -> list[str]:
    """Remove run folders (ones this project made: they hold state.json) that no live process holds and that
    hold no checkpoint: what a run killed before its first checkpoint leaves. Returns their run ids.
    Folders with a checkpoint stay resumable; folders holding a set-aside damaged file stay for the user."""
    removed: list[str] = []
    if not ckpt_root.is_dir():
        return removed
    for state_file in ckpt_root.glob(f"*/{STATE}"):
        folder = state_file.parent
        weights = folder / WEIGHTS
        if (weights / LAST).exists() or (weights / BEST).exists() or any(weights.glob(f"*{DAMAGED}*")):
            continue
        if folder in _claims or not _claim(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        _release(folder)
        removed.append(folder.name)
    return removed


def _history(folder: Path, epoch: int | None) -> list[dict[str, float]]:
    """The per-epoch rows kept beside the checkpoint, up to `epoch` (a best.ckpt may be older than the rows)."""
    try:
        rows = json.loads((folder / HISTORY).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(rows, list):
        return []
    return [
        r for r in rows if isinstance(r, dict) and (epoch is None or r.get("epoch", 0) <= epoch + 1)
    ]  # rows count from 1


def _claim(folder: Path) -> bool:
    """Hold `folder` for this process (a non-blocking exclusive flock on its .lock file); False if a live process
    holds it. Where no lock can be taken (read-only, no flock), the folder counts as free, as before."""
    if folder in _claims:
        return True
    if fcntl is None:
        return True
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    except OSError:
        pass  # no flock here: keep the descriptor, hold nothing
    _claims[folder] = fd
    return True


def _release(folder: Path) -> None:
    fd = _claims.pop(folder, None)
    if fd is not None:
        os.close(fd)


def weights_dir(folder: Path) -> Path:
    return folder / WEIGHTS


def start_checkpoints(cfg: Config, ckpt_root: Path, run_id: str) -> Path:
    """The run's folder, held by this process (before state.json exists, so no cleanup takes it for stale)."""
    folder = ckpt_root / run_id
    folder.mkdir(parents=True, exist_ok=True)
    _claim(folder)
    write_json_atomic(folder / STATE, {"run_id": run_id, "config_digest": config_digest(cfg)})
    return folder


def outputs_dir(folder: Path) -> Path:
    """Where the run writes its models/ files before publishing them (its own: two trainings never share it)."""
    out = folder / OUTPUTS
    out.mkdir(parents=True, exist_ok=True)
    return out


class HistoryFile:
    """Metric sink that keeps the per-epoch rows on disk, so a resumed run's curves start at epoch 1."""

    def __init__(self, folder: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = folder / HISTORY
        self.rows = list(rows or [])

    def __call__(self, metrics: dict[str, float], epoch: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [{"epoch": epoch, **metrics}]
        write_json_atomic(self.path, self.rows)


def finish_checkpoints(folder: Path) -> None:
    """A completed run's checkpoints are not needed again (the model is in models/ and MLflow). Checkpoints set
    aside as damaged stay (alone in the folder) for the user to inspect."""
    weights = folder / WEIGHTS
    kept = list(weights.glob(f"*{DAMAGED}*")) if weights.is_dir() else []
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        for path in folder.iterdir():
            if path.is_dir() and path != weights:
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file():
                path.unlink(missing_ok=True)
        for path in weights.iterdir():
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    _release(folder)
