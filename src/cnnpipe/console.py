"""Progress and warning lines for the user, on stderr so stage outputs stay clean."""

from __future__ import annotations

import logging
import sys
import time
import warnings


def info(stage: str, message: str) -> None:
    print(f"[{stage}] {message}", file=sys.stderr, flush=True)


def warn(stage: str, message: str) -> None:
    print(f"[{stage}] warning: {message}", file=sys.stderr, flush=True)


class Progress:
    """'done/total' lines at most every `every` seconds (and at the end): progress without a flood."""

    def __init__(self, stage: str, what: str, total: int, every: float = 2.0) -> None:
        self.stage, self.what, self.total, self.every = stage, what, total, every
        self._last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done == self.total or now - self._last >= self.every:
            self._last = now
            info(self.stage, f"{self.what} {done}/{self.total}")


def quiet_library_noise() -> None:
    """Silence known, harmless third-party chatter by logger or exact message (never wholesale)."""
    # Lightning's start-up banner (GPU/TPU availability, tips) at INFO; its warnings still show.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
