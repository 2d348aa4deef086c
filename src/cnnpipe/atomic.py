"""Atomic outputs: write beside the target, then rename, so an interrupted stage leaves no half file.

An output folder is replaced only when it holds nothing but what its stage writes: a misconfigured path (the
project itself, a folder of the user's) is refused, never removed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnnpipe.errors import CnnpipeError


class OutputFolderError(CnnpipeError):
    """An output path names something cnnpipe did not write (a file, a folder holding other things)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get normal permissions
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_replaceable(target: Path, names: Collection[str] = (), written: Path | None = None) -> None:
    """Raise OutputFolderError unless `target` is absent, an empty folder, or a folder holding only what the
    stage writes: entries named in `names`, or present in `written` (the stage's new folder; sub-folders are
    compared entry by entry). So folders written by any cnnpipe version are replaced; the project root, a
    source folder or a folder holding a user's file are not."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise OutputFolderError(f"{target} is a file, not an output folder: move it away or choose another path")
    foreign = _foreign(target, set(names), written)
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputFolderError(
            f"refusing to replace {target}: it holds {shown}, which this stage does not write; "
            "move that out or choose another output folder"
        )


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _foreign(folder: Path, names: set[str], written: Path | None) -> list[str]:
    """Entries of `folder` (relative names) that neither `names` nor the `written` folder account for."""
    foreign: list[str] = []
    for entry in sorted(folder.iterdir()):
        twin = written / entry.name if written is not None else None
        if _is_folder(entry):
            if twin is None or not _is_folder(twin):
                foreign.append(entry.name)
            else:
                foreign += [f"{entry.name}/{name}" for name in _foreign(entry, set(), twin)]
        elif entry.name not in names and not (twin is not None and (twin.is_symlink() or twin.is_file())):
            foreign.append(entry.name)
    return foreign


@contextmanager
def atomic_dir(target: Path, names: Collection[str] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it takes the place of `target` (old one removed).

    `names`: the entries the stage writes; given, an existing `target` holding anything else is refused before
    anything is written. Either way the old folder is removed only if it holds nothing but `names` and what
    the stage just wrote (check_replaceable), so a folder cnnpipe did not write is never removed."""
    target = Path(target).resolve()  # a linked output folder: replace the folder, keep the link
    if names is not None:
        check_replaceable(target, names)
    elif target.exists() and not target.is_dir():
        check_replaceable(target)  # a file: refused
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if target.exists():
            check_replaceable(target, names or (), written=tmp)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
