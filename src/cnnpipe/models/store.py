"""Save and load a model as spec JSON + safetensors weights: loading never unpickles anything.

A models folder is published as one unit (`publish_model`): under an exclusive lock on the folder, with the
weights' and spec's sha256 in `run.json`, so a reader (under the shared lock) never pairs one run's id with
another run's weights, and a file changed by hand or half-copied is refused in one line naming it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from cnnpipe.atomic import atomic_path, write_json_atomic
from cnnpipe.errors import DataError
from cnnpipe.models.factory import build_model

try:
    import fcntl
except ImportError:  # not POSIX: no locks (the sha256 check in run.json still catches a mixed folder)
    fcntl = None  # type: ignore[assignment]

WEIGHTS = "model.safetensors"
SPEC = "model.json"
RUN_FILE = "run.json"  # the train run that made the folder's model, with the files' sha256
WEIGHTS_SHA = "weights_sha256"
SPEC_SHA = "spec_sha256"


def save_model(folder: Path, net: nn.Module, spec: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / SPEC, spec)


def file_sha256(*paths: Path) -> str:
    """sha256 of the files' bytes, one after the other, read 1 MiB at a time (weights, or a run's data splits)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@contextmanager
def models_lock(folder: Path, exclusive: bool) -> Iterator[None]:
    """An flock on the folder itself (no lock file to track): exclusive to publish, shared to read.
    No lock where the folder does not exist or the filesystem has no flock."""
    if fcntl is None or not folder.is_dir():
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        with suppress(OSError):  # e.g. a filesystem without flock: carry on unlocked
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def publish_model(staging: Path, folder: Path, names: list[str]) -> tuple[dict[str, Any] | None, float | None]:
    """Copy `names` (run.json last) from `staging` into `folder` as one unit, under the exclusive lock; each file
    lands by rename, so a reader sees a whole file. Returns the run.json it replaced (None if none or unreadable)
    and when that was published (its mtime)."""
    folder.mkdir(parents=True, exist_ok=True)
    ordered = [n for n in names if n != RUN_FILE] + ([RUN_FILE] if RUN_FILE in names else [])
    with models_lock(folder, exclusive=True):
        try:
            when: float | None = (folder / RUN_FILE).stat().st_mtime
            previous = json.loads((folder / RUN_FILE).read_text())
        except (OSError, ValueError):
            when, previous = None, None
        for name in ordered:
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(staging / name, tmp)
    return (previous, when) if isinstance(previous, dict) else (None, None)


def load_model(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model in eval mode on the CPU, and its spec."""
    net, spec, _ = load_published(folder)
    return net, spec


def load_published(folder: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any] | None]:
    """The model, its spec and its run.json (None if the folder has none), read together under the shared lock.
    When run.json records the files' sha256, they must match: a mismatch is a DataError naming the file."""
    spec_path, weights_path, run_path = folder / SPEC, folder / WEIGHTS, folder / RUN_FILE
    if not spec_path.is_file() or not weights_path.is_file():
        raise DataError(f"{folder}: no trained model ({SPEC} + {WEIGHTS}); run `dvc repro train` first")
    with models_lock(folder, exclusive=False):
        run = _read_json(run_path) if run_path.is_file() else None
        if run is not None and not isinstance(run, dict):
            raise DataError(f"{run_path}: not a cnnpipe run file (expected a JSON object); re-run `dvc repro train`")
        spec_bytes, weights = spec_path.read_bytes(), weights_path.read_bytes()
    if run is not None:
        for path, data, key in ((weights_path, weights, WEIGHTS_SHA), (spec_path, spec_bytes, SPEC_SHA)):
            expected, actual = run.get(key), hashlib.sha256(data).hexdigest()
            if expected and expected != actual:
                raise DataError(
                    f"{path}: does not belong to run {run.get('run_id')} named in {run_path} (sha256 {actual[:12]}, "
                    f"run.json says {str(expected)[:12]}): changed by hand or half-copied; re-run `dvc repro train`"
                )
    try:
        spec = json.loads(spec_bytes)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{spec_path}: not valid JSON ({exc}); re-run `dvc repro train`") from None
    try:
        net = build_model(spec)
    except Exception as exc:  # a JSON file that is not a model spec: KeyError, TypeError, ValueError...
        raise DataError(f"{spec_path}: not a cnnpipe model spec ({type(exc).__name__}: {exc})") from None
    try:
        state = load_safetensors(weights)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for a damaged file
        raise DataError(f"{weights_path}: not a readable safetensors file ({exc}); re-run `dvc repro train`") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"{weights_path}: does not fit the model in {spec_path} ({first})") from None
    return net.eval(), spec, run


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); re-run `dvc repro train`") from None
