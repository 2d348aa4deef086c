"""Where B1's train step spends its time, and what each part of the fix buys (not part of run_all).

1. cProfile of `cnnpipe.training.fit.fit` (the B1 "ours" side): cumulative seconds in the net's forward,
   backward, the optimiser, our training_step, Lightning's manual_backward / LightningOptimizer.step
   wrappers, torchmetrics updates and `LightningModule.log`, and the own time of all Lightning functions.
2. Interleaved ablation, same data, config, seed and threads on every side:
   - `lightning`: one step per Lightning iteration (`trainer.steps_per_call=1`), with a callback that listens
     to `on_after_backward`, as any gradient-logging callback would;
   - `ours`: the default, `trainer.steps_per_call` steps per iteration (the same public `manual_backward` /
     `LightningOptimizer.step` per step);
   - `raw`: B1's hand-written loop.

Run: python -m bench.b1_profile [--repeats N] [--threads N] [--epochs N] [--data digits|mnist5k] [--device cpu|cuda]
Writes bench/results/B1_profile.json (shown under B1's details in docs/benchmarks.md, not as a table row).
"""

from __future__ import annotations

import cProfile
import dataclasses
import pstats
import tempfile
from pathlib import Path
from typing import Any

from bench.b1_train_step import overrides, train_ours, train_raw
from bench.timing import cli, interleaved, median, paired_ratios, pin_threads, spread, write_result
from bench.timing import result as make_result
from bench.workspace import bench_config, prepare_data, quiet

NAME = "B1_profile"


def hook_listener() -> Any:
    """A callback on a per-step hook: Lightning's own backward/step wrappers must then run every step."""
    from lightning.pytorch.callbacks import Callback

    class ListensToBackward(Callback):
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            pass

    return ListensToBackward()


def with_steps_per_call(cfg: Any, per_call: int) -> Any:
    """`cfg` with `trainer.steps_per_call` set (the ablation's and bench.b1_step_modes' sides)."""
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps_per_call=per_call))


# (label, pstats key filter: a substring of "file:line(function)") for the cumulative breakdown.
BUCKETS = [
    ("LightningModule.log", "lightning/pytorch/core/module.py", "(log)"),
    ("torchmetrics Metric.update (train/val metrics)", "torchmetrics/metric.py", "(wrapped_func)"),
    ("forward of the net", "torch/nn/modules/module.py", "(_wrapped_call_impl)"),
    ("backward (torch)", "torch/_tensor.py", "(backward)"),
    ("Lightning manual_backward", "lightning/pytorch/core/module.py", "(manual_backward)"),
    ("optimizer step (torch, AdamW)", "torch/optim/adam.py", "(step)"),
    ("LightningOptimizer.step", "lightning/pytorch/core/optimizer.py", "(step)"),
    ("training_step (ours: all steps of a call)", "cnnpipe/training/module.py", "(training_step)"),
    ("Trainer.fit (total)", "lightning/pytorch/trainer/trainer.py", "(fit)"),
]


def profile_fit(cfg: Any, meta: dict[str, Any], train: Any, val: Any) -> dict[str, float]:
    train_ours(cfg, meta, train, val, {})  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    train_ours(cfg, meta, train, val, {})
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for label, path_part, func in BUCKETS:
        total = 0.0
        for (filename, _line, name), (_cc, _nc, _tt, cumtime, _callers) in stats.items():
            if path_part in filename and f"({name})" == func:
                total = max(total, cumtime)  # recursion-safe: the outermost entry
        out[label] = total
    hooks = sum(
        v[2] for (f, _l, n), v in stats.items() if "lightning/pytorch" in f or "lightning_utilities" in f
    )  # own time of every Lightning function
    out["own time of all Lightning/lightning_utilities Python functions"] = hooks
    return out


def run(
    repeats: int | None = None,
    quick: bool = False,
    threads: int = 1,
    epochs: int | None = None,
    data: str = "digits",
    device: str = "cpu",
) -> dict:
    repeats = repeats or (3 if quick else 7)
    epochs = epochs or (2 if quick else 4)
    name = "-".join([NAME, *([data] if data != "digits" else []), *([device] if device != "cpu" else [])])
    pin_threads(threads)
    quiet()
    cfg = bench_config(overrides(threads, epochs, data, device))
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-b1p-") as tmp:
        meta, train, val = prepare_data(Path(tmp), cfg)
    breakdown = profile_fit(cfg, meta, train, val)
    for label, seconds in breakdown.items():
        print(f"[{name}] {seconds:7.3f} s  {label}")
    single = with_steps_per_call(cfg, 1)
    sides = {
        "lightning": lambda out: train_ours(single, meta, train, val, out, callbacks=[hook_listener()]),
        "ours": lambda out: train_ours(cfg, meta, train, val, out),
        "raw": lambda out: train_raw(cfg, meta, train, val, out),
    }
    last: dict[str, dict[str, float]] = {side: {} for side in sides}
    samples = interleaved(
        {side: (lambda side=side: sides[side](last[side])) for side in sides}, repeats, warmup=1, label=name
    )
    vs_raw = {side: median(paired_ratios(samples["raw"], samples[side])) for side in sides if side != "raw"}
    for side, ratio in vs_raw.items():
        print(f"[{name}] {side}/raw throughput {ratio:.3f}")
    record = make_result(
        name=name,
        title="B1 profile and ablation",
        what=f"{data} on {device}: fit() under cProfile; one step per iteration / "
        f"{cfg.trainer.steps_per_call} steps per call vs raw loop, interleaved",
        ours=f"ours: {vs_raw['ours']:.3f} of raw",
        baseline=f"one step per iteration: {vs_raw['lightning']:.3f} of raw",
        ratio=vs_raw["ours"],
        ratio_label="ours/raw throughput",
        goal_op=">=",
        goal=0.97,
        threads=threads,
        quick=quick,
        details={
            "unit": "s (cProfile, one fit) and images/s ratios",
            "profile_cumulative_s": breakdown,
            "fit_s": {side: spread(samples[side]) for side in sides},
            "over_raw_throughput": vs_raw,
            "steps_per_call": cfg.trainer.steps_per_call,
            "repeats": repeats,
            "epochs_per_run": epochs,
            "sanity_last_repeat": last,
        },
    )
    record["table"] = False
    write_result(record)
    return record


def _options(parser: Any) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run")
    parser.add_argument("--data", default="digits", help="data config (digits; mnist5k: 28x28, augment=none)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16-mixed on all sides")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    run(args.repeats, args.quick, args.threads, args.epochs, args.data, args.device)


if __name__ == "__main__":
    main()
