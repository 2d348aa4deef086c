"""Run the benchmarks (each in its own process, one after another), then regenerate docs/benchmarks.md.

    python -m bench.run_all                     # all, full settings (~20 min on 2 cores)
    python -m bench.run_all --only B1,B2        # a selection (names as in the table; case-insensitive)
    python -m bench.run_all --quick             # fewer repeats and less work: a smoke test
    python -m bench.run_all --report-only       # just rebuild docs/benchmarks.md from bench/results/*.json

B3 reproduces the default pipeline in a temporary project copy and hands that copy to B8 (no-op repro), so
running both costs one full repro. A benchmark that fails is reported and the others still run; the exit
status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.timing import DEFAULT_THREADS, RESULTS, now, pin_threads
from bench.workspace import ROOT

# name -> module; run in this order (B3 before B8: B8 reuses B3's reproduced project).
BENCHMARKS = {
    "B1": "bench.b1_train_step",
    "B2": "bench.b2_augment",
    "B5": "bench.b5_mlflow_logging",
    "pruning": "bench.pruning",
    "transfer": "bench.transfer",
    "prepare_checks": "bench.prepare_checks",
    "monitor_drift": "bench.monitor_drift",  # on the project's own models/ (after `make run`)
    "B7": "bench.ddp_scaling",
    "B3": "bench.b3_time_to_accuracy",
    "B8": "bench.b8_noop_repro",
}


def select(only: str | None) -> list[str]:
    if not only:
        return list(BENCHMARKS)
    wanted = {w.strip().lower() for w in only.split(",") if w.strip()}
    unknown = wanted - {n.lower() for n in BENCHMARKS}
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return [n for n in BENCHMARKS if n.lower() in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated names, e.g. B1,B2,pruning")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and less work (smoke test)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch/OpenMP threads per process")
    parser.add_argument("--report-only", action="store_true", help="only regenerate docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.report_only:
        report.write()
        return 0
    names = select(args.only)
    pin_threads(args.threads)
    seconds: dict[str, float] = {}
    failed: list[str] = []
    shared = Path(tempfile.mkdtemp(prefix="cnnpipe-bench-project-"))
    start_all = time.perf_counter()
    try:
        for name in names:
            cmd = [sys.executable, "-m", BENCHMARKS[name], "--threads", str(args.threads)]
            if args.quick:
                cmd.append("--quick")
            if name == "B3" and "B8" in names:
                cmd += ["--keep-project", str(shared / "project")]
            if name == "B8" and (shared / "project" / "dvc.lock").is_file():
                cmd += ["--project", str(shared / "project")]
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            start = time.perf_counter()
            code = subprocess.call(cmd, cwd=ROOT)
            seconds[name] = time.perf_counter() - start
            print(f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds[name]:.0f} s", flush=True)
            if code != 0:
                failed.append(name)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    total = time.perf_counter() - start_all
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"date": now(), "quick": args.quick, "only": names, "seconds": seconds, "total_s": total}
    summary["failed"] = failed
    if set(names) == set(BENCHMARKS):  # a partial run keeps the last full run's summary
        (RESULTS / "_run_all.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.write()
    print(f"\nbench: {total / 60:.1f} min in total; " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    if failed:
        print(f"bench: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
