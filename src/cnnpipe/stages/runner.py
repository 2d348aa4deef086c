"""What every `pipelines/<stage>.py` shares: overrides from argv, config, one-line errors, exit codes."""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnnpipe import threads
from cnnpipe.config import Config, find_project_root, load_config
from cnnpipe.console import quiet_library_noise
from cnnpipe.errors import CnnpipeError
from cnnpipe.redact import mask_secrets

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk or an exhausted quota: the user frees space and re-runs
_ATOMIC_TEMP = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")  # atomic.py's temporary names: .<target>.<random>.tmp


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_stage(name: str, body: Callable[[Config, Path], Any], argv: list[str] | None = None) -> None:
    """Run `body(cfg, project_root)` under `command_errors("cnnpipe <stage>")`."""
    with command_errors(f"cnnpipe {name}"):
        root = find_project_root()
        cfg = load_config(list(sys.argv[1:] if argv is None else argv), root=root)
        threads.apply(cfg, name, say=False)  # every stage: a neighbour must not stall a 2-thread team
        body(cfg, root)


@contextmanager
def command_errors(prog: str) -> Iterator[None]:
    """How every cnnpipe command ends: user errors -> `<prog>: error: ...` and exit 2, a full disk too (`no space
    left on device writing <file>`: atomic outputs leave nothing half-written, an MLflow run ends FAILED);
    Ctrl-C / SIGTERM -> exit 130 after the body's own cleanup (MLflow run marked KILLED). Any other exception
    keeps Python's traceback and exit code 1, with the URIs in it masked."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    sys.excepthook = _masked_excepthook
    quiet_library_noise()
    try:
        yield
    except CnnpipeError as exc:
        print(f"{prog}: error: {mask_secrets(str(exc))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        full = no_space_error(exc)
        if full is None:
            raise  # a bug: its traceback, printed by `_masked_excepthook`
        written = written_file(full) or written_file(exc)
        where = f" writing {output_name(written)}" if written else ""
        print(f"{prog}: error: no space left on device{where} (free some space, then re-run)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


@contextmanager
def tool_command(prog: str, script: str) -> Iterator[Path | None]:
    """What the tools that are no DVC stage (predict, export, monitor) share: `command_errors`, no MLflow progress
    bars on the terminal, and the project `script` lives in, yielded (None for a copied script: a models folder
    and explicit paths still work)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with command_errors(prog):
        try:
            root: Path | None = find_project_root(Path(script).resolve().parent)
        except CnnpipeError:
            root = None
        yield root


# What libraries say for a full disk when they raise no OSError: safetensors' Rust I/O errors ("No space left on
# device (os error 28)"), SQLite's SQLITE_FULL ("database or disk is full"), and the errno texts themselves.
_NO_SPACE_TEXT = re.compile(
    "|".join([*(re.escape(os.strerror(e)) for e in NO_SPACE), *(rf"os error {e}\b" for e in NO_SPACE)])
    + "|database or disk is full",
    re.IGNORECASE,
)


def no_space_error(exc: BaseException | None) -> BaseException | None:
    """The full-disk error behind `exc` (itself, or anywhere in its cause / context chain): an OSError with errno
    ENOSPC / EDQUOT, or a library's error that says so in its message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc
        if not isinstance(exc, OSError) and _NO_SPACE_TEXT.search(str(exc)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def written_file(exc: BaseException) -> str | None:
    """The file a failed write was for: the OSError's own file name (a copy's destination), else the temporary
    file of an atomic write (`atomic_path`'s `.<name>.<random>.tmp`) that the innermost cnnpipe frame was writing."""
    if isinstance(exc, OSError) and exc.filename is not None:  # a copy or move names its destination second
        name = exc.filename2 if exc.filename2 is not None else exc.filename
        return os.fsdecode(name) if not isinstance(name, int) else None
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    for frame in reversed(frames):
        if not frame.f_globals.get("__name__", "").startswith("cnnpipe."):
            continue
        for value in frame.f_locals.values():
            if isinstance(value, Path) and any(_ATOMIC_TEMP.match(part) for part in value.parts):
                return str(value)
    return None


def output_name(filename: str) -> str:
    """The output a write was for: atomic.py's temporary names mapped back to their target, relative to the cwd
    (the project root under DVC) when inside it."""
    path = Path(filename)
    path = Path(*[m.group("name") if (m := _ATOMIC_TEMP.match(part)) else part for part in path.parts])
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _masked_excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """Python's own traceback for an unexpected error, with every URI in it masked: database drivers and
    SQLAlchemy quote connection URLs, passwords included, in their messages."""
    sys.stderr.write(mask_secrets("".join(traceback.format_exception(kind, exc, tb))))
