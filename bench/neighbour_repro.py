"""`dvc repro` from scratch alone, then beside a busy neighbour (a second `dvc repro` of the same code in another
copy, started at the same moment; or, `--modes alone,busy`, a single-thread Python busy loop): the wall time of
each, and the ratio beside/alone. Issue #15 item 5.

    python -m bench.neighbour_repro --label before --rev HEAD       # the committed code
    python -m bench.neighbour_repro --label after                   # the working tree as it is
    python -m bench.neighbour_repro --label after --overlay src/cnnpipe/threads.py ...   # HEAD + these files

Each copy runs its own code (PYTHONPATH=<copy>/src, the project's venv first on PATH), with no OMP_NUM_THREADS
and no MLFLOW_TRACKING_URI in the environment, so the thread policy under test is the code's own. `--set` edits
params.yaml in every copy alike (default: sweep.n_trials=4, to keep the four runs short). A run that passes
`--limit` seconds is stopped and reported as "> limit". Not part of `make bench`: it takes 10-40 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"


def make_copy(dest: Path, rev: str | None, overlay: list[str], sets: list[str]) -> Path:
    dest.mkdir(parents=True)
    if rev:
        tar = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(tar)) as t:
            t.extractall(dest, filter="data")
    else:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        for rel in files:
            if (ROOT / rel).is_file() and not rel.startswith(("data/prepared", "data/augmented", "models/", "eval/")):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    for rel in overlay:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for item in sets:
        key, value = item.split("=", 1)
        *path, last = key.split(".")
        node = params
        for p in path:
            node = node[p]
        node[last] = yaml.safe_load(value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def env_for(copy: Path) -> dict[str, str]:
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(copy / "src")
    return env


def start(copy: Path) -> subprocess.Popen[bytes]:
    log = open(copy / "repro.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=copy, env=env_for(copy), stdout=log, stderr=log)


def finish(proc: subprocess.Popen[bytes], t0: float, limit: float) -> float | str:
    try:
        proc.wait(timeout=max(1.0, limit - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return f"> {limit / 60:.0f} min"
    if proc.returncode != 0:
        return f"failed (exit {proc.returncode})"
    return round(time.monotonic() - t0, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    ap.add_argument("--rev", default=None, help="a git revision (default: the working tree)")
    ap.add_argument("--overlay", nargs="*", default=[], help="working-tree files copied over the revision")
    ap.add_argument("--set", nargs="*", default=["sweep.n_trials=4"], dest="sets")
    ap.add_argument("--modes", default="alone,pair", help="alone, pair (a second dvc repro), busy (a 1-core loop)")
    ap.add_argument("--limit", type=float, default=25 * 60, help="seconds before a run is stopped")
    ap.add_argument("--keep", action="store_true", help="keep the copies (their repro.log)")
    args = ap.parse_args(argv)
    out: dict[str, object] = {
        "label": args.label,
        "rev": args.rev or "working tree",
        "overlay": args.overlay,
        "set": args.sets,
        "nproc": len(os.sched_getaffinity(0)),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f"cnnpipe-neighbour-{args.label}-"))
    try:
        for mode in args.modes.split(","):
            n = 2 if mode == "pair" else 1
            copies = [make_copy(tmp / f"{mode}{i}", args.rev, args.overlay, args.sets) for i in range(n)]
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if mode == "busy" else None
            load = os.getloadavg()[0]
            t0 = time.monotonic()
            procs = [start(c) for c in copies]
            walls = [finish(p, t0, args.limit) for p in procs]
            if busy:
                busy.kill()
                busy.wait()
            out[mode] = {"wall_s": walls, "load_at_start": round(load, 2)}
            print(f"{args.label} {mode}: {walls} (1-min load at start {load:.2f})", flush=True)
        alone = out.get("alone")
        for mode in ("pair", "busy"):
            beside = out.get(mode)
            if isinstance(alone, dict) and isinstance(beside, dict):
                a, b = alone["wall_s"][0], beside["wall_s"][0]
                if isinstance(a, float) and isinstance(b, float):
                    out[f"ratio_{mode}_over_alone"] = round(b / a, 2)
                    print(f"{args.label}: {mode}/alone {b / a:.2f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"copies kept in {tmp}")
    RESULTS.mkdir(exist_ok=True)
    # "_": bench.report skips it (not a table row); the figures are in docs/benchmarks.md by hand
    (RESULTS / f"_neighbour-{args.label}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
