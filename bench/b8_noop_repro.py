"""B8: wall time of a no-op `dvc repro` on an up-to-date project.

A temporary copy of the project is reproduced once (by B3 when run from run_all, which hands its copy over;
alone: a fresh copy with the e2e tests' shortened pipeline, which has the same stages, deps and outs, so DVC's
no-op work is the same), then `dvc repro` runs once as a warm-up and `--repeats` times timed. Each run must
say "Data and pipelines are up to date" and run no stage. Venv first on PATH, as `make run` does.

Run alone: python -m bench.b8_noop_repro [--quick] [--repeats N] [--threads N] [--project DIR]
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.timing import cli, median, pin_threads, result, spread, write_result
from bench.workspace import copy_project, dvc, python, run_timed

NAME = "B8"
SHORT = ["augment.copies=1", "sweep.n_trials=2", "sweep.space.epochs.low=2", "sweep.space.epochs.high=3"]


def noop_times(project: Path, threads: int, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):  # the first is the warm-up (OS file cache, Python bytecode)
        elapsed, out = run_timed([dvc(), "repro"], project, threads)
        if "Running stage" in out or "up to date" not in out:
            raise RuntimeError(f"dvc repro was not a no-op in {project}:\n{out[-2000:]}")
        if i:
            times.append(elapsed)
            print(f"[{NAME}] no-op dvc repro {i}/{repeats}: {elapsed:.2f} s", flush=True)
    return times


def run(repeats: int | None = None, quick: bool = False, threads: int = 1, project: Path | None = None) -> dict:
    repeats = repeats or (5 if quick else 7)
    pin_threads(threads)
    own = project is None
    tmp = Path(tempfile.mkdtemp(prefix="cnnpipe-bench-b8-")) if own else None
    try:
        if tmp is not None:
            project = copy_project(tmp)
            run_timed([python(), "-m", "cnnpipe.config", "compose", "--out", "params.yaml", *SHORT], project, threads)
            run_timed([dvc(), "repro"], project, threads, timeout=1800)
        assert project is not None
        times = noop_times(project, threads, repeats)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    med = median(times)
    record = result(
        name=NAME,
        title="no-op dvc repro",
        what="wall s of `dvc repro` on an up-to-date 5-stage project copy"
        + (" (shortened pipeline)" if own else " (the copy B3 reproduced)"),
        ours=f"{med:.2f} s (median of {repeats})",
        baseline="goal 2 s",
        ratio=med,
        ratio_label="s",
        goal_op="<=",
        goal=2.0,
        threads=threads,
        quick=quick,
        details={"unit": "s", "noop_s": spread(times), "samples_s": times, "repeats": repeats, "warmup": 1},
    )
    write_result(record)
    return record


def _options(parser: Any) -> None:
    parser.add_argument("--project", type=Path, default=None, help="an up-to-date project copy (run_all: B3's)")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    run(args.repeats, args.quick, args.threads, args.project)


if __name__ == "__main__":
    main()
