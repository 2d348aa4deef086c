"""Ctrl-C while the MLflow store refuses writes: the interrupt stays an interrupt (exit 130), whatever the cleanup
writes raise, and the run left open is closed by the next run in the experiment.

Found on a fresh clone: a SIGINT during a sweep trial, an SQLite store answering "database is locked" to the
trial's cleanup writes, and the MlflowException raised there replaced the KeyboardInterrupt; the sweep counted one
failed trial, went on, and exited 0. The store here is a real SQLite MLflow store; a trigger makes it refuse the
writes the way a locked database does."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnpipe.tracking.runs import interrupt_behind, tracked_run
from tests.helpers import stage_env

PROBE = """
import os, signal, sqlite3, sys, time
from pathlib import Path
from cnnpipe.stages.runner import command_errors
from cnnpipe.tracking.runs import tracked_run

root, tables = Path(sys.argv[1]), sys.argv[2].split(",")
with command_errors("probe"):
    with tracked_run(f"sqlite:///{root / 'mlflow.db'}", root, "exp", "probe", {"cnnpipe.stage": "probe"}) as run:
        print(run.run_id, flush=True)
        con = sqlite3.connect(root / "mlflow.db")
        for table in tables:
            con.execute(
                f"CREATE TRIGGER refuse_{table} BEFORE {'UPDATE' if table == 'runs' else 'INSERT'} ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'database is locked'); END"
            )
        con.commit()
        con.close()
        try:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered here
            time.sleep(30)
        finally:
            run.set_tags({"probe.state": "interrupted"})  # a cleanup write, as a sweep trial makes
"""


@pytest.mark.parametrize("tables", ["runs", "runs,tags"], ids=["run-end-refused", "cleanup-and-run-end-refused"])
def test_ctrl_c_stays_an_interrupt_when_the_store_refuses_the_cleanup_writes(tmp_path: Path, tables: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), tables],
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "probe: interrupted" in proc.stderr
    assert "could not be marked KILLED" in proc.stderr  # said, in one line, not a traceback
    assert "Traceback" not in proc.stderr
    run_id = proc.stdout.split()[0]
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    assert client.get_run(run_id).info.status == "RUNNING"  # the store refused: the run is still open ...
    con = sqlite3.connect(db)
    for table in tables.split(","):
        con.execute(f"DROP TRIGGER refuse_{table}")
    con.commit()
    con.close()
    with tracked_run(f"sqlite:///{db}", tmp_path, "exp", "next", {"cnnpipe.stage": "probe"}):
        pass
    assert client.get_run(run_id).info.status == "KILLED"  # ... until the next run closes it (its process is gone)


def test_the_interrupt_is_found_behind_errors_raised_while_handling_it() -> None:
    def cleanup_fails() -> None:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("database is locked")

    with pytest.raises(RuntimeError) as caught:
        cleanup_fails()
    assert isinstance(interrupt_behind(caught.value), KeyboardInterrupt)
    try:
        raise ValueError("outer") from RuntimeError("cause only")
    except ValueError as exc:
        assert interrupt_behind(exc) is None  # a cause is not an interrupt in flight
