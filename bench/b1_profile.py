"""Where B1's train step spends its time, and what the proposed fix in src/ would buy (not part of run_all).

1. cProfile of `cnnpipe.training.fit.fit` (the B1 "ours" side): cumulative seconds in `LightningModule.log`,
   in torchmetrics updates, in Lightning's hook dispatch, and in the actual compute (forward, backward, AdamW).
2. Interleaved A/B/C: the current fit vs the same Trainer with a *proposed* ImageClassifier (a subclass defined
   here, not in src/: per step only `train_acc.update` and a loss sum on the device; `train/loss` and `train/acc`
   logged once, on the epoch's last batch; torchmetrics argument validation off) vs the raw loop of B1.
   Same data, config, seed and threads on all sides. The logged values equal the current ones exactly.

Since commit ee00dc9 src/cnnpipe/training/module.py contains this change, so "proposed" equals "current" in
substance; the profile then shows what is left (Lightning's own loop).

Run: python -m bench.b1_profile [--repeats N] [--threads N] [--epochs N] [--data digits|mnist5k] [--device cpu|cuda]
Writes bench/results/B1_profile.json (shown under B1's details in docs/benchmarks.md, not as a table row).
"""

from __future__ import annotations

import cProfile
import pstats
import tempfile
from pathlib import Path
from typing import Any

from bench.b1_train_step import overrides, train_ours, train_raw
from bench.timing import cli, interleaved, median, paired_ratios, pin_threads, spread, stopwatch, write_result
from bench.timing import result as make_result
from bench.workspace import bench_config, prepare_data, quiet

NAME = "B1_profile"


def proposed_module_class() -> type:
    """ImageClassifier as proposed for src/cnnpipe/training/module.py (see bench/findings.md)."""
    import torch
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    from cnnpipe.training.module import ImageClassifier

    class ProposedClassifier(ImageClassifier):
        def __init__(self, net: Any, num_classes: int, *args: Any, **kwargs: Any) -> None:
            super().__init__(net, num_classes, *args, **kwargs)
            self.train_acc = MulticlassAccuracy(num_classes, validate_args=False)
            self.val_acc = MulticlassAccuracy(num_classes, validate_args=False)
            self.val_f1 = MulticlassF1Score(num_classes, average="macro", validate_args=False)

        def on_train_epoch_start(self) -> None:
            self.loss_sum, self.seen = torch.zeros((), device=self.device), 0

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            logits = self(x)
            loss = self._loss(logits, y)
            self.train_acc.update(logits, y)  # update only: no per-batch compute, no per-step self.log
            self.loss_sum += loss.detach() * y.shape[0]  # on the device: no host sync per step
            self.seen += y.shape[0]
            if self.trainer.is_last_batch:  # log once per epoch, before the callbacks' on_train_epoch_end
                # DDP: ranks hold equal-sized shards, so the mean of the rank means is the global mean
                self.log("train/loss", self.loss_sum / self.seen, on_step=False, on_epoch=True, sync_dist=True)
                self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
            return loss

    return ProposedClassifier


def train_proposed(cfg: Any, meta: dict[str, Any], train: Any, val: Any, out: dict[str, float]) -> float:
    """What `fit` does (seed, model, data module, EpochHistory, build_trainer), with the proposed module."""
    import inspect

    import lightning.pytorch as pl

    from cnnpipe.data.datamodule import InMemoryDataModule
    from cnnpipe.models.factory import build_model, model_spec
    from cnnpipe.training.callbacks import EpochHistory
    from cnnpipe.training.module import ImageClassifier
    from cnnpipe.training.trainer import build_trainer

    cls = proposed_module_class()
    with stopwatch() as t:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        spec = model_spec(cfg.model, meta)
        kwargs = {}
        if "scale_lr" in inspect.signature(ImageClassifier.__init__).parameters:
            kwargs["scale_lr"] = getattr(cfg.trainer, "scale_lr", "none")
        module = cls(build_model(spec), len(spec["classes"]), cfg.optim, cfg.train.label_smoothing, **kwargs)
        history = EpochHistory(quiet=True)
        trainer = build_trainer(cfg, [history])
        trainer.fit(module, datamodule=InMemoryDataModule(train, val, cfg.data.batch_size, cfg.seed))
    out["val_acc"], out["train_loss"] = history.rows[-1]["val/acc"], history.rows[-1]["train/loss"]
    return t["s"]


# (label, pstats key filter: a substring of "file:line(function)") for the cumulative breakdown.
BUCKETS = [
    ("LightningModule.log (per-step self.log)", "lightning/pytorch/core/module.py", "(log)"),
    ("torchmetrics Metric.forward (train_acc(logits, y))", "torchmetrics/metric.py", "(forward)"),
    ("forward of the net", "torch/nn/modules/module.py", "(_wrapped_call_impl)"),
    ("backward", "torch/_tensor.py", "(backward)"),
    ("optimizer.step incl. Lightning's closure (training_step + backward)", "torch/optim/adam.py", "(step)"),
    ("training_step (ours, incl. forward, loss, logging)", "cnnpipe/training/module.py", "(training_step)"),
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
    last: dict[str, dict[str, float]] = {"current": {}, "proposed": {}, "raw": {}}
    samples = interleaved(
        {
            "current": lambda: train_ours(cfg, meta, train, val, last["current"]),
            "proposed": lambda: train_proposed(cfg, meta, train, val, last["proposed"]),
            "raw": lambda: train_raw(cfg, meta, train, val, last["raw"]),
        },
        repeats,
        warmup=1,
        label=name,
    )
    cur_vs_raw = median(paired_ratios(samples["raw"], samples["current"]))
    prop_vs_raw = median(paired_ratios(samples["raw"], samples["proposed"]))
    record = make_result(
        name=name,
        title="B1 profile and the proposed fix",
        what=f"{data} on {device}: fit() under cProfile; current vs proposed ImageClassifier vs raw loop, interleaved",
        ours=f"proposed: {prop_vs_raw:.3f} of raw",
        baseline=f"current: {cur_vs_raw:.3f} of raw",
        ratio=prop_vs_raw,
        ratio_label="proposed/raw throughput",
        goal_op=">=",
        goal=0.97,
        threads=threads,
        quick=quick,
        details={
            "unit": "s (cProfile, one fit) and images/s ratios",
            "profile_cumulative_s": breakdown,
            "current_fit_s": spread(samples["current"]),
            "proposed_fit_s": spread(samples["proposed"]),
            "raw_fit_s": spread(samples["raw"]),
            "current_over_raw_throughput": cur_vs_raw,
            "proposed_over_raw_throughput": prop_vs_raw,
            "proposed_over_current_throughput": median(paired_ratios(samples["current"], samples["proposed"])),
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
