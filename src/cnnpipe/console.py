"""Progress and warning lines for the user, on stderr so stage outputs stay clean."""

from __future__ import annotations

import sys
import time


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
