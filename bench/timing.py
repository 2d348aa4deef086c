"""Shared timing helpers: thread pinning, interleaved A/B repeats, medians and ratios, machine facts,
the command line every benchmark accepts, and the result files in bench/results/.

Every comparison runs its sides interleaved (A, B, A, B, ...) after a warm-up of each side, so slow drift on
a shared machine (other people's tests) hits both sides alike; the reported ratio is the median of the
per-repeat ratios, next to the raw medians of each side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_THREADS = 1  # on a shared 2-core machine one thread per process is the stable choice (see docs)


def pin_threads(threads: int) -> None:
    """Set the thread count explicitly: env for child processes and OpenMP, torch for this process."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then `t["s"]` holds the elapsed seconds (perf_counter)."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


def interleaved(
    sides: dict[str, Callable[[], float]], repeats: int, warmup: int = 1, label: str = ""
) -> dict[str, list[float]]:
    """Call each side `warmup` times (discarded), then `repeats` rounds: A, B, ... in even rounds and in
    reverse order in odd ones (ABBA), so a drift of the machine's speed or an after-effect of one side on the
    next (garbage, caches) does not always favour the same side. Each call returns its own measurement
    (seconds of the timed region), so set-up outside that region is not counted; garbage is collected
    before each call, outside it."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            gc.collect()
            samples[name].append(sides[name]())
        if label:
            shown = "  ".join(f"{name} {values[-1]:.4g}" for name, values in samples.items())
            print(f"[{label}] repeat {i + 1}/{repeats}: {shown}", flush=True)
    return samples


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": median(values), "min": min(values), "max": max(values)}


def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_requested": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def goal_met(value: float | None, op: str, goal: float) -> bool | None:
    if value is None:
        return None
    return value >= goal if op == ">=" else value <= goal


def result(
    *,
    name: str,
    title: str,
    what: str,
    ours: str,
    baseline: str,
    ratio: float | None,
    ratio_label: str,
    goal_op: str,
    goal: float,
    threads: int,
    details: dict[str, Any],
    notes: list[str] | None = None,
    date: str | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """One benchmark's record: what the table shows (ours, baseline, ratio, goal) and everything behind it."""
    return {
        "name": name,
        "title": title,
        "what": what,
        "ours": ours,
        "baseline": baseline,
        "ratio": ratio,
        "ratio_label": ratio_label,
        "goal": f"{ratio_label} {goal_op} {goal:g}",
        "goal_op": goal_op,
        "goal_value": goal,
        "met": goal_met(ratio, goal_op, goal),
        "date": date or now(),
        "quick": quick,
        "machine": machine(threads),
        "details": details,
        "notes": notes or [],
    }


def write_result(record: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{record['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    print(f"[{record['name']}] {record['ours']} vs {record['baseline']}: {record['goal']} -> {record['ratio']}")
    print(f"[{record['name']}] wrote {path}", flush=True)
    return path


def cli(
    doc: str | None, argv: list[str] | None = None, extra: Callable[[argparse.ArgumentParser], Any] | None = None
) -> argparse.Namespace:
    """The options every benchmark takes when run alone: --quick, --repeats N, --threads N (+ its own `extra`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and less work (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default per benchmark)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch/OpenMP threads per process")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)
