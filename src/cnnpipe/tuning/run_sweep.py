"""The sweep stage: create (or resume) the study, run the workers, write sweep/ and log the parent run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from cnnpipe.atomic import atomic_dir, write_text_atomic
from cnnpipe.config import Config, as_dict, flatten
from cnnpipe.console import info, warn
from cnnpipe.data.store import load_meta
from cnnpipe.errors import CnnpipeError
from cnnpipe.tracking.runs import RunLogger, tracked_run
from cnnpipe.tracking.tags import run_tags
from cnnpipe.tracking.uri import mask_secrets
from cnnpipe.training.run_training import experiment_name
from cnnpipe.tuning.report import counts, trial_rows, trials_csv, write_plots
from cnnpipe.tuning.storage import describe_storage, recover_dead_trials
from cnnpipe.tuning.study import load_study, study_name
from cnnpipe.tuning.worker import run_worker

PARENT_ATTR = "cnnpipe.mlflow_parent_run_id"
BEST_FILE = "best_params.yaml"


def worker_env(index: int, threads: int, gpus: int) -> dict[str, str]:
    """Environment of local worker `index`: its share of CPU threads, and on a machine with several GPUs
    its own GPU (round robin), so workers never share a device."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if gpus > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)]
    return env


def _spawn_workers(cfg: Config, root: Path, parent_run_id: str) -> None:
    """`sweep.workers` local processes on the one study, CPU threads (and GPUs) shared out between them."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // cfg.sweep.workers)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with tempfile.TemporaryDirectory(prefix="cnnpipe-sweep-") as tmp:
        cfg_file = Path(tmp) / "config.yaml"
        tree = as_dict(cfg)
        tree["trainer"]["threads"] = cfg.trainer.threads or threads
        cfg_file.write_text(yaml.safe_dump(tree))
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cnnpipe.tuning.worker",
                    "--config",
                    str(cfg_file),
                    "--root",
                    str(root),
                    "--index",
                    str(i),
                    "--parent",
                    parent_run_id,
                ],
                env=worker_env(i, threads, gpus),
            )
            for i in range(cfg.sweep.workers)
        ]
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)  # each worker fails and re-queues its running trial
            for p in procs:
                p.wait()
            raise
    if any(codes):
        raise CnnpipeError(f"sweep worker(s) exited with codes {codes}; the study can be resumed by re-running")


def _log_parent(run: RunLogger, cfg: Config, best: dict[str, Any], out: Path) -> None:
    if best["best_trial"] is not None:
        run.log_metrics({f"best/{cfg.sweep.metric}": best["best_value"]}, step=0)
        run.set_tags({f"cnnpipe.best.{k}": str(v) for k, v in best["params"].items()})  # tags: change on resume
    run.log_metrics({f"trials/{k}": v for k, v in best["trials"].items()}, step=0)
    run.set_tags({"cnnpipe.best_trial": str(best["best_trial"])})
    for name in (BEST_FILE, "trials.csv", "history.png", "importances.png", "parallel.png"):
        run.log_artifact(out / name)


def run_sweep(cfg: Config, root: Path) -> dict[str, Any]:
    load_meta(root / cfg.paths.prepared)  # fail early, naming the file, when prepare has not run
    name = study_name(cfg)
    storage = describe_storage(cfg, root)
    if cfg.sweep.workers > 1 and storage.startswith("sqlite"):
        warn("sweep", "SQLite storage is not safe for concurrent workers; use the journal default or PostgreSQL")
    study = load_study(cfg, root, create=True)
    recovered = recover_dead_trials(study)
    if recovered:
        info("sweep", f"re-queued {recovered} trial(s) left running by a worker that died")
    experiment = experiment_name(cfg)
    tags = {
        **run_tags(root, "sweep", cfg.data.name, ""),
        "cnnpipe.study": name,
        "cnnpipe.optuna_storage": mask_secrets(storage),
    }
    info(
        "sweep",
        f"study {name} ({len(study.trials)} trials so far, {cfg.sweep.n_trials} in total) in {mask_secrets(storage)}",
    )
    with tracked_run(
        cfg.tracking.uri, root, experiment, f"sweep-{name}", tags, reopen_run_id=study.user_attrs.get(PARENT_ATTR)
    ) as run:
        study.set_user_attr(PARENT_ATTR, run.run_id)
        run.log_params(_sweep_params(cfg), only_new=True)
        run.set_tags({f"cnnpipe.sweep.{k}": str(getattr(cfg.sweep, k)) for k in ("n_trials", "timeout", "workers")})
        if cfg.sweep.workers == 1:
            run_worker(cfg, root, run.run_id)
        else:
            _spawn_workers(cfg, root, run.run_id)
        best = _best(study, cfg, name, storage, run.run_id)
        out = root / cfg.paths.sweep
        with atomic_dir(out) as tmp:
            write_text_atomic(tmp / "trials.csv", trials_csv(trial_rows(study)))
            write_text_atomic(tmp / BEST_FILE, yaml.safe_dump(best, sort_keys=False))
            write_plots(study, tmp)
        _log_parent(run, cfg, best, out)
    if best["best_trial"] is None:
        raise CnnpipeError(f"no trial of study {name} completed ({best['trials']}); see {out / 'trials.csv'}")
    info("sweep", f"best {cfg.sweep.metric} {best['best_value']:.4f} (trial {best['best_trial']}): {best['params']}")
    return best


def _sweep_params(cfg: Config) -> dict[str, Any]:
    """What defines the study (per-invocation settings such as n_trials go into tags: they may change)."""
    skip = ("paths.", "tracking.", "sweep.n_trials", "sweep.timeout", "sweep.workers", "sweep.storage")
    return {k: v for k, v in flatten(as_dict(cfg)).items() if not k.startswith(skip)}


def _best(study: Any, cfg: Config, name: str, storage: str, parent_run_id: str) -> dict[str, Any]:
    n = counts(study)
    summary: dict[str, Any] = {
        "study": name,
        "storage": mask_secrets(storage),
        "metric": cfg.sweep.metric,
        "direction": cfg.sweep.direction,
        "best_trial": None,
        "best_value": None,
        "params": {},
        "mlflow_parent_run_id": parent_run_id,
        "mlflow_trial_run_id": None,
        "trials": {k: n[k] for k in ("total", "complete", "pruned", "failed")},
    }
    if n["complete"]:
        best = study.best_trial
        summary.update(
            best_trial=best.number,
            best_value=float(best.value),
            params=dict(best.params),
            mlflow_trial_run_id=best.user_attrs.get("cnnpipe.mlflow_run_id"),
        )
    return summary
