"""Where benchmarks run: the project's config, digits data prepared into a temporary folder, and temporary
copies of the project for the benchmarks that drive real stages and `dvc repro`. Nothing here writes into
the project itself (its data/, models/, mlflow.db stay untouched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What a project copy leaves out: outputs and stores (like tests/conftest.py's copy_project), and our results.
NOT_COPIED = ("data/", "models/", "eval/", "mlflow.db", "bench/results/", "checkpoints/", "sweep/", ".optuna/")


def bench_config(overrides: list[str]) -> Any:
    """The project's params.yaml with Hydra-syntax overrides, validated (cnnpipe.config.load_config)."""
    from cnnpipe.config import load_config

    return load_config(list(overrides), root=ROOT)


def prepare_data(root: Path, cfg: Any) -> tuple[dict[str, Any], Any, Any]:
    """Run the library's prepare + augment into `root` (paths as configured, relative to it);
    returns (meta, augmented train split, val split)."""
    from cnnpipe.data.store import load_meta, load_split
    from cnnpipe.stages.augment import write_augmented
    from cnnpipe.stages.prepare import prepare_splits

    prepare_splits(cfg, root / cfg.paths.prepared)
    write_augmented(cfg, root)
    meta = load_meta(root / cfg.paths.prepared)
    train = load_split(root / cfg.paths.augmented / "train.npz")
    val = load_split(root / cfg.paths.prepared / "val.npz")
    return meta, train, val


def quiet() -> None:
    """Lightning's banner off (cnnpipe's own filter), so benchmark output stays readable."""
    import logging

    from cnnpipe.console import quiet_library_noise

    quiet_library_noise()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)


def copy_project(dest: Path) -> Path:
    """A copy of the project's sources (tracked and untracked-not-ignored files, no outputs, no store, no
    dvc.lock) as a fresh git repository: what tests/conftest.py's copy_project makes."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file() and not rel.startswith(NOT_COPIED):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    git = ["git", "-c", "user.email=bench@cnnpipe", "-c", "user.name=bench"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "bench copy"], cwd=dest, check=True)
    return dest


def stage_env(threads: int) -> dict[str, str]:
    """Environment for stage subprocesses: the venv first on PATH (DVC runs `python ...`), explicit threads,
    no ambient MLflow URI (each copy uses its own store)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def run_timed(cmd: list[str], cwd: Path, threads: int, timeout: float = 900) -> tuple[float, str]:
    """Run a command, return (wall seconds, stdout + stderr); raise with the output's tail on failure."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=stage_env(threads), capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}) in {cwd}:\n{out[-3000:]}")
    return elapsed, out


def dvc() -> str:
    return str(BIN / "dvc")


def python() -> str:
    return str(BIN / "python")
