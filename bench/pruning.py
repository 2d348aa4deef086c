"""Pruning: epochs a sweep consumes with the median pruner (the default sweep config) vs without
(`sweep.pruner=none`), on the same search space, data and sampler/training seeds.

For each seed the two studies run back to back (pruned, then unpruned) through the real code:
`cnnpipe.tuning.study.load_study` creates each study (its own name, a journal file in a temporary folder) and
`cnnpipe.tuning.worker.run_worker` runs its trials (TrialObjective: fit + PruneOn +
a child MLflow run per trial, into a temporary SQLite store). Data: digits with `augment=none` (prepared once,
seed 42, shared by every study). Epochs a trial consumed = the number of intermediate values it reported.

Measure (per seed): epochs consumed, trial by trial in order, until the study's best completed trial is within
0.2 points (0.002 accuracy) of the unpruned study's best value; ratio = unpruned epochs / pruned epochs, 0 when
the pruned study never gets there (goal: median over seeds >= 2). Also reported: total epochs of each whole
study and its best value.

Run alone: python -m bench.pruning [--quick] [--repeats N (seeds)] [--threads N] [--trials N] [--set KEY=VALUE]...
(with --set, e.g. `--set sweep.space.epochs.low=16 --set sweep.space.epochs.high=16`, the result is
`pruning-variant`, shown as its own row.)
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.timing import cli, median, pin_threads, result, write_result
from bench.workspace import bench_config, prepare_data, quiet

NAME = "pruning"
TOLERANCE = 0.002
BASE_SEED = 42


def study_overrides(
    seed: int, pruner: str, n_trials: int, root: Path, threads: int, tag: str, extra: list[str] | None = None
) -> list[str]:
    return [
        "augment=none",
        f"seed={seed}",
        f"sweep.pruner={pruner}",
        f"sweep.n_trials={n_trials}",
        "sweep.workers=1",
        "sweep.storage=null",
        f"sweep.study_name=bench-{tag}-{pruner}-seed{seed}",
        "paths.optuna=optuna",  # relative to the temporary root: <tmp>/optuna/journal.log
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "trainer.accelerator=cpu",
        f"trainer.threads={threads}",
        *(extra or []),
    ]


def run_study(cfg: Any, root: Path) -> dict[str, Any]:
    """Create the study and run its trials with the real worker; return what each trial consumed."""
    from optuna.trial import TrialState

    from cnnpipe.tuning.study import load_study
    from cnnpipe.tuning.worker import run_worker

    load_study(cfg, root, create=True)
    start = time.perf_counter()
    run_worker(cfg, root, parent_run_id=None, label=f"bench {cfg.sweep.pruner} seed {cfg.seed}")
    wall = time.perf_counter() - start
    study = load_study(cfg, root)
    trials = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        trials.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "epochs": len(t.intermediate_values),
                "value": t.value if t.state == TrialState.COMPLETE else None,
                "params": dict(t.params),
            }
        )
    completed = [t["value"] for t in trials if t["value"] is not None]
    return {
        "study": cfg.sweep.study_name,
        "wall_s": wall,
        "total_epochs": sum(t["epochs"] for t in trials),
        "best_value": max(completed) if completed else None,
        "pruned_trials": sum(t["state"] == "pruned" for t in trials),
        "trials": trials,
    }


def epochs_to_target(trials: list[dict[str, Any]], target: float) -> int | None:
    """Epochs consumed, in trial order, until the best completed trial reaches `target` (None: never)."""
    used, best = 0, -math.inf
    for t in trials:
        used += t["epochs"]
        if t["value"] is not None:
            best = max(best, t["value"])
        if best >= target:
            return used
    return None


def run(
    repeats: int | None = None,
    quick: bool = False,
    threads: int = 1,
    n_trials: int | None = None,
    extra: list[str] | None = None,
) -> dict:
    """`extra`: config overrides for both sides (a variant; its result is `pruning-variant`, not `pruning`)."""
    seeds = repeats or 3
    name = f"{NAME}-variant" if extra else NAME
    n_trials = n_trials or (4 if quick else 8)
    pin_threads(threads)
    quiet()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tag = time.strftime("%Y%m%d%H%M%S")
    per_seed = []
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-pruning-") as tmp_name:
        root = Path(tmp_name)
        base = bench_config(study_overrides(BASE_SEED, "median", n_trials, root, threads, tag, extra))
        prepare_data(root, base)
        space = {k: asdict(v) for k, v in base.sweep.space.items()}
        for i in range(seeds):
            seed = BASE_SEED + i
            pruned = run_study(bench_config(study_overrides(seed, "median", n_trials, root, threads, tag, extra)), root)
            unpruned = run_study(bench_config(study_overrides(seed, "none", n_trials, root, threads, tag, extra)), root)
            if unpruned["best_value"] is None:
                raise RuntimeError(f"seed {seed}: no trial of the unpruned study completed")
            target = unpruned["best_value"] - TOLERANCE
            e_pruned = epochs_to_target(pruned["trials"], target)
            e_unpruned = epochs_to_target(unpruned["trials"], target)
            ratio = (e_unpruned / e_pruned) if e_pruned else 0.0
            per_seed.append(
                {
                    "seed": seed,
                    "target": target,
                    "epochs_to_target_pruned": e_pruned,
                    "epochs_to_target_unpruned": e_unpruned,
                    "ratio": ratio,
                    "total_epochs_ratio": unpruned["total_epochs"] / max(1, pruned["total_epochs"]),
                    "pruned": pruned,
                    "unpruned": unpruned,
                }
            )
            print(
                f"[{name}] seed {seed}: target {target:.4f}; epochs to target pruned {e_pruned} / unpruned "
                f"{e_unpruned} (x{ratio:.2f}); whole study {pruned['total_epochs']} / {unpruned['total_epochs']} "
                f"epochs, best {pruned['best_value']} / {unpruned['best_value']}",
                flush=True,
            )
    ratio = median([s["ratio"] for s in per_seed])
    e_p = [s["epochs_to_target_pruned"] for s in per_seed]
    e_u = [s["epochs_to_target_unpruned"] for s in per_seed]
    shown_p = ", ".join("never" if e is None else str(e) for e in e_p)
    shown_u = ", ".join(str(e) for e in e_u)
    record = result(
        name=name,
        title="sweep pruning (median pruner)",
        what=f"epochs until best trial within {TOLERANCE} of the unpruned best; default sweep config, "
        f"{n_trials} trials, augment=none, {seeds} seeds" + (f"; variant: {' '.join(extra)}" if extra else ""),
        ours=f"{shown_p} epochs (median pruner, per seed; whole studies {_totals(per_seed, 'pruned')})",
        baseline=f"{shown_u} epochs (no pruning; whole studies {_totals(per_seed, 'unpruned')})",
        ratio=ratio,
        ratio_label="unpruned/pruned",
        goal_op=">=",
        goal=2.0,
        threads=threads,
        quick=quick,
        details={
            "unit": "epochs",
            "per_seed": per_seed,
            "ratio_per_seed": [s["ratio"] for s in per_seed],
            "epochs_to_target_pruned": [e if e is not None else "never" for e in e_p],
            "epochs_to_target_unpruned": e_u,
            "best_value_pruned": [s["pruned"]["best_value"] for s in per_seed],
            "best_value_unpruned": [s["unpruned"]["best_value"] for s in per_seed],
            "pruned_trials_per_study": [s["pruned"]["pruned_trials"] for s in per_seed],
            "wall_s_pruned": [s["pruned"]["wall_s"] for s in per_seed],
            "wall_s_unpruned": [s["unpruned"]["wall_s"] for s in per_seed],
            "total_epochs_pruned": [s["pruned"]["total_epochs"] for s in per_seed],
            "total_epochs_unpruned": [s["unpruned"]["total_epochs"] for s in per_seed],
            "median_total_epochs_ratio": median([s["total_epochs_ratio"] for s in per_seed]),
            "n_trials": n_trials,
            "seeds": [s["seed"] for s in per_seed],
            "search_space": space,
            "pruner": {"n_startup_trials": base.sweep.n_startup_trials, "n_warmup_epochs": base.sweep.n_warmup_epochs},
            "sampler": base.sweep.sampler,
            "tolerance": TOLERANCE,
        },
        notes=[
            "whole-study epochs, unpruned/pruned (median over seeds): "
            f"{median([s['total_epochs_ratio'] for s in per_seed]):.2f}"
        ],
    )
    write_result(record)
    return record


def _totals(per_seed: list[dict[str, Any]], side: str) -> str:
    return ", ".join(str(s[side]["total_epochs"]) for s in per_seed)


def _options(parser: Any) -> None:
    parser.add_argument("--trials", type=int, default=None, help="trials per study")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both sides")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    run(args.repeats, args.quick, args.threads, args.trials, args.set)


if __name__ == "__main__":
    main()
