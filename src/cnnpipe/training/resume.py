"""Resumable training: each run checkpoints into `checkpoints/<mlflow run id>/`; an interrupted run leaves
its folder behind, and `train.resume=auto` picks it up again when the config is the same."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.atomic import write_json_atomic
from cnnpipe.config import Config, as_dict

STATE = "state.json"
WEIGHTS = "lightning"  # Lightning's own checkpoint folder inside a run's folder
LAST = "last.ckpt"
HISTORY = "history.json"


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

    @property
    def last_checkpoint(self) -> Path:
        return self.folder / WEIGHTS / LAST


def find_resumable(cfg: Config, ckpt_root: Path) -> Resumable | None:
    """The newest interrupted run with the same config and a last checkpoint, if `train.resume=auto`."""
    if cfg.train.resume != "auto" or not ckpt_root.is_dir():
        return None
    digest = config_digest(cfg)
    candidates: list[tuple[int, Path, str]] = []
    for state_file in ckpt_root.glob(f"*/{STATE}"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        last = state_file.parent / WEIGHTS / LAST
        if state.get("config_digest") == digest and last.is_file():
            candidates.append((last.stat().st_mtime_ns, state_file.parent, str(state["run_id"])))
    if not candidates:
        return None
    _, folder, run_id = max(candidates)
    history_file = folder / HISTORY
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    return Resumable(run_id, folder, history)


def weights_dir(folder: Path) -> Path:
    return folder / WEIGHTS


def start_checkpoints(cfg: Config, ckpt_root: Path, run_id: str) -> Path:
    folder = ckpt_root / run_id
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / STATE, {"run_id": run_id, "config_digest": config_digest(cfg)})
    return folder


class HistoryFile:
    """Metric sink that keeps the per-epoch rows on disk, so a resumed run's curves start at epoch 1."""

    def __init__(self, folder: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = folder / HISTORY
        self.rows = list(rows or [])

    def __call__(self, metrics: dict[str, float], epoch: int) -> None:
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + [{"epoch": epoch, **metrics}]
        write_json_atomic(self.path, self.rows)


def finish_checkpoints(folder: Path) -> None:
    """A completed run's checkpoints are not needed again (the model is in models/ and MLflow)."""
    shutil.rmtree(folder, ignore_errors=True)
