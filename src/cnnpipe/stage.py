"""What every `pipelines/<stage>.py` shares: overrides from argv, config, one-line errors, exit codes."""

from __future__ import annotations

import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnpipe.config import Config, find_project_root, load_config
from cnnpipe.errors import CnnpipeError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def quiet_library_noise() -> None:
    """Silence known, harmless third-party chatter by logger or exact message (never wholesale)."""
    import logging

    # Lightning's start-up banner (GPU/TPU availability, tips) at INFO; its warnings still show.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")


def run_stage(name: str, body: Callable[[Config, Path], Any], argv: list[str] | None = None) -> None:
    """Run `body(cfg, project_root)`; user errors -> `cnnpipe <stage>: error: ...` and exit 2;
    Ctrl-C / SIGTERM -> exit 130 after the body's own cleanup (MLflow run marked KILLED)."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    quiet_library_noise()
    try:
        root = find_project_root()
        cfg = load_config(list(sys.argv[1:] if argv is None else argv), root=root)
        body(cfg, root)
    except CnnpipeError as exc:
        print(f"cnnpipe {name}: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"cnnpipe {name}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
