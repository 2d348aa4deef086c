"""Who owns a run, a trial or a lock: `host:pid:start`, and whether that owner is still alive.

A bare pid is not enough. A killed child that its parent has not reaped yet is a zombie: `kill(pid, 0)`
still succeeds, so a liveness check on the pid alone calls it alive. And pids are reused, so an old owner's
pid may belong to an unrelated process by now. The process's start time (field 22 of /proc/<pid>/stat, in
clock ticks since boot) tells the owner apart from a later process with the same pid.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _start_ticks(pid: int) -> str | None:
    """The process's start time since boot, or None (no such process, a zombie, or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    fields = text[text.rfind(")") + 2 :].split()
    state, start = fields[0], fields[19]
    return None if state in ("Z", "X") else start


def owner_token(pid: int | None = None) -> str:
    """`host:pid:start` of this process (or of `pid` on this host)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}"


def owner_alive(token: str) -> bool | None:
    """True/False for an owner on this host; None when the owner lives on another host (cannot tell).

    Accepts the older `host:pid` form too (no start time: the pid alone decides)."""
    host, _, rest = token.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname():
        return None
    if not pid_text.isdigit():
        return False
    now = _start_ticks(int(pid_text))
    if now is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (not Linux): the pid alone decides
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return not start or now == start
