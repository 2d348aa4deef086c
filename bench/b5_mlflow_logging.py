"""B5: epoch time with MLflow logging at the default cadence vs no logging, same training.

Both sides run `cnnpipe.training.fit.fit` (the real train path: ImageClassifier, build_trainer, EpochHistory)
on the same data, config, seed and thread count, without checkpoints. The logged side passes the
`RunLogger.log_metrics` sink of a real run in a real SQLite store (`tracked_run`, created once before the
repeats so migrations are not counted; the run is opened outside the timed region): one `log_batch` per epoch,
as the train stage does. The unlogged side passes no sink. Reported: seconds per epoch (fit wall / epochs).
Also measured: the cost of one `log_metrics` call into the same store, and the overhead it implies.

Run alone: python -m bench.b5_mlflow_logging [--quick] [--repeats N] [--threads N]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import cli, interleaved, median, paired_ratios, pin_threads, result, spread, stopwatch, write_result
from bench.workspace import bench_config, prepare_data, quiet

NAME = "B5"
EXPERIMENT = "cnnpipe-bench-b5"


def overrides(threads: int, epochs: int, uri: str) -> list[str]:
    return [
        "augment=default",
        "model=cnn",
        "data.batch_size=64",
        f"train.epochs={epochs}",
        "train.hparams=params",
        "train.early_stopping_patience=0",
        "trainer.accelerator=cpu",
        f"trainer.threads={threads}",
        f"tracking.uri={uri}",
    ]


def run(repeats: int | None = None, quick: bool = False, threads: int = 1) -> dict:
    repeats = repeats or (5 if quick else 15)  # the effect (~1 %) is below the machine's noise: many short pairs
    epochs = 2
    pin_threads(threads)
    quiet()
    from cnnpipe.tracking.runs import tracked_run
    from cnnpipe.training.fit import fit

    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-b5-") as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        cfg = bench_config(overrides(threads, epochs, uri))
        meta, train, val = prepare_data(tmp, cfg)
        with tracked_run(uri, tmp, EXPERIMENT, "warm-store", {}) as run:  # migrations happen here, untimed
            run.log_metrics({"warm": 0.0}, step=0)
        epochs_logged: list[int] = []

        def logged() -> float:
            with tracked_run(uri, tmp, EXPERIMENT, "b5-logged", {"cnnpipe.stage": "bench"}) as run:
                with stopwatch() as t:
                    res = fit(cfg, meta, train, val, ckpt_dir=None, sinks=[run.log_metrics], quiet=True)
                epochs_logged.append(len(res.history))
            return t["s"] / epochs

        def unlogged() -> float:
            with stopwatch() as t:
                fit(cfg, meta, train, val, ckpt_dir=None, sinks=None, quiet=True)
            return t["s"] / epochs

        samples = interleaved({"logged": logged, "unlogged": unlogged}, repeats, warmup=1, label=NAME)
        call_ms = _log_call_ms(tracked_run, uri, tmp, 20 if quick else 50)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        logged_runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'b5-logged'")
        steps = sorted({len(client.get_metric_history(r.info.run_id, "val/acc")) for r in logged_runs})
    ratio = median(paired_ratios(samples["logged"], samples["unlogged"]))
    epoch_ms = median(samples["unlogged"]) * 1000
    details = {
        "unit": "s/epoch",
        "logged_s_per_epoch": spread(samples["logged"]),
        "unlogged_s_per_epoch": spread(samples["unlogged"]),
        "samples_s_per_epoch": samples,
        "ratio_per_repeat": paired_ratios(samples["logged"], samples["unlogged"]),
        "repeats": repeats,
        "warmup": 1,
        "epochs_per_repeat": epochs,
        "log_metrics_call_ms": call_ms,
        "implied_ratio_from_call_cost": 1 + call_ms["median"] / epoch_ms,
        "val_acc_points_per_logged_run": steps,
        "store": "SQLite (fresh file, migrated before the repeats)",
        "train_images": len(train.labels),
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
    }
    record = result(
        name=NAME,
        title="MLflow logging overhead",
        what=f"s/epoch, fit() on augmented digits, {epochs} epochs per run, RunLogger.log_metrics per epoch "
        "into SQLite vs no sink",
        ours=f"{median(samples['logged']):.3f} s/epoch (logged; one log call {call_ms['median']:.1f} ms)",
        baseline=f"{median(samples['unlogged']):.3f} s/epoch (no logging)",
        ratio=ratio,
        ratio_label="logged/unlogged",
        goal_op="<=",
        goal=1.02,
        threads=threads,
        quick=quick,
        details=details,
        notes=[
            f"one log_metrics call (one log_batch of ~8 metrics) into the SQLite store: {call_ms['median']:.1f} ms "
            f"median, i.e. {call_ms['median'] / epoch_ms * 100:.2f} % of a {epoch_ms:.0f} ms epoch"
        ],
    )
    write_result(record)
    return record


def _log_call_ms(tracked_run: Any, uri: str, root: Path, calls: int) -> dict[str, float]:
    """Milliseconds per `RunLogger.log_metrics` call with an epoch's worth of metrics, same store."""
    metrics = {
        "train/loss": 0.1,
        "train/acc": 0.9,
        "val/loss": 0.1,
        "val/acc": 0.9,
        "val/f1_macro": 0.9,
        "lr": 0.001,
        "epoch_time_s": 1.0,
    }
    times = []
    with tracked_run(uri, root, EXPERIMENT, "b5-call-cost", {}) as run:
        for step in range(calls):
            start = time.perf_counter()
            run.log_metrics(metrics, step)
            times.append((time.perf_counter() - start) * 1000)
    return spread(times)


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv)
    run(args.repeats, args.quick, args.threads)


if __name__ == "__main__":
    main()
