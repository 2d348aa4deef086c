"""B1 step modes: keep `trainer.steps_per_call` and the direct step, or retire them for Lightning's automatic
optimisation? A side-by-side measurement (not part of run_all); the decision and its numbers are in
docs/design.md ("The training step"). bench/results/B1_step_modes.json holds the numbers it was taken on, with
the direct step (training/direct_step.py, since deleted) still in the code: `ours` and `ours1` called backward
and the optimiser directly. Since then every step goes through Lightning's public wrappers, so `ours` is what
`ours_public` measured, and a run of this script now shows `ours` and `ours_public` equal.

Every side trains the same net (`cnnpipe.models.factory.build_model`, same seed), on the same data, with the
same optimiser and scheduler (AdamW + OneCycleLR stepped per batch), batch size, epochs and thread count, with
per-epoch validation, interleaved (ABBA after one warm-up of each side, bench.timing.interleaved):

- `raw`: B1's hand-written PyTorch loop (bench.b1_train_step.train_raw);
- `ours`: the default, `cnnpipe.training.fit.fit` with `trainer.steps_per_call=8` (direct step when measured);
- `ours1`: the same with `trainer.steps_per_call=1` (direct step, one optimiser step per Lightning iteration);
- `automatic`: what retiring gives: a LightningModule written the way Lightning's examples are (automatic
  optimisation; `training_step` = forward, cross-entropy, torchmetrics `update`, `self.log(on_step=False,
  on_epoch=True)`; `configure_optimizers` returns AdamW + OneCycleLR with interval "step"), fed by cnnpipe's own
  `InMemoryDataModule` with `steps_per_call=1` and run by cnnpipe's `build_trainer` with the `EpochHistory`
  callback, as `fit` does: only the step differs;
- `auto_epoch`: automatic optimisation too, but the metrics kept on the device and logged once per epoch as
  `ImageClassifier` does today (no per-step `self.log` / torchmetrics `update`): what retiring only
  `steps_per_call` and the direct step, and keeping today's metric handling, gives;
- `ours_public` (only with --sides): `steps_per_call=8` through Lightning's public `manual_backward` /
  `LightningOptimizer.step` (a no-op callback on `on_after_backward` turns the direct step off, as in
  bench.b1_profile): what "contain it with no private API" gives.

Reported per side: side/raw throughput (whole fit: raw seconds / side seconds, per repeat; median, min, max), the
steady state (raw / side median epoch time over epochs 2..E, training + validation), and the same whole-fit ratio
in process CPU seconds (time.process_time: steadier than wall time when other work shares the 2 cores).

Run: python -m bench.b1_step_modes [--repeats N] [--threads N] [--epochs N] [--data digits|mnist5k|cifar-synthetic]
                                   [--model NAME] [--n N] [--sides raw,ours,...]
Writes bench/results/B1_step_modes.json: one entry per data set under details.by_data (a run replaces its data set's
entry and keeps the others); not a table row of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.b1_profile import hook_listener, with_steps_per_call
from bench.b1_train_step import SYNTHETIC, overrides, synthetic_data, train_ours, train_raw
from bench.timing import RESULTS, cli, interleaved, median, paired_ratios, pin_threads, spread, stopwatch, write_result
from bench.timing import result as make_result
from bench.workspace import bench_config, prepare_data, quiet

NAME = "B1_step_modes"
SIDES = ("raw", "ours", "ours1", "automatic", "auto_epoch")
EXTRA_SIDES = ("ours_public",)  # only when asked for with --sides


def automatic_module(net: Any, num_classes: int, cfg: Any, per_epoch_metrics: bool) -> Any:
    """The alternative under test: automatic optimisation, as in Lightning's examples. With
    `per_epoch_metrics`, predictions/labels/losses are kept on the device and handed to torchmetrics and
    `self.log` once per epoch (today's ImageClassifier metric handling) instead of every step."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

    def summarise(outputs: list) -> tuple[Any, Any, Any, int]:
        preds, targets, losses = zip(*outputs, strict=True)
        sizes = [len(t) for t in targets]
        weights = torch.tensor(sizes, dtype=torch.float64, device=losses[0].device)
        return torch.cat(preds), torch.cat(targets), (torch.stack(losses).double() * weights).sum(), sum(sizes)

    class AutoClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
            self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
            self.val_f1 = MulticlassF1Score(num_classes, average="macro", validate_args=False)
            self._epoch: list = []
            self._val: list = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), y, label_smoothing=cfg.train.label_smoothing)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self(x)
            loss = self._loss(logits, y)
            if per_epoch_metrics:
                self._epoch.append((logits.detach().argmax(1), y, loss.detach()))
                if self.trainer.is_last_batch:
                    preds, targets, loss_sum, n = summarise(self._epoch)
                    self._epoch = []
                    self.log("train/loss", (loss_sum / n).float(), on_step=False, on_epoch=True, batch_size=1)
                    self.train_acc.update(preds, targets)
                    self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
            else:
                self.train_acc.update(logits.detach(), y)
                self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
                self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            loss = self._loss(logits, y)
            if per_epoch_metrics:
                self._val.append((logits.argmax(1), y, loss))
                return
            self.val_acc.update(logits, y)
            self.val_f1.update(logits, y)
            self.log("val/loss", loss, on_epoch=True, batch_size=len(y))
            self.log("val/acc", self.val_acc, on_epoch=True)
            self.log("val/f1_macro", self.val_f1, on_epoch=True)

        def on_validation_epoch_end(self) -> None:
            if not (per_epoch_metrics and self._val):
                return
            preds, targets, loss_sum, n = summarise(self._val)
            self._val = []
            self.log("val/loss", (loss_sum / n).float(), on_epoch=True, batch_size=n)
            self.val_acc.update(preds, targets)
            self.val_f1.update(preds, targets)
            self.log("val/acc", self.val_acc, on_epoch=True)
            self.log("val/f1_macro", self.val_f1, on_epoch=True)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
            total = int(self.trainer.estimated_stepping_batches)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optim.lr, total_steps=total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return AutoClassifier()


def train_automatic(
    cfg: Any, meta: dict[str, Any], train: Any, val: Any, out: dict[str, Any], per_epoch_metrics: bool = False
) -> float:
    """What `fit` does (seed, net, data module, EpochHistory, build_trainer, trainer.fit, net back on the CPU),
    with the automatic-optimisation module and one batch per Lightning iteration. Timed: the whole call."""
    import lightning.pytorch as pl

    from cnnpipe.models.factory import build_model, model_spec
    from cnnpipe.training.callbacks import EpochHistory
    from cnnpipe.training.fit import datamodule
    from cnnpipe.training.trainer import build_trainer

    with stopwatch() as t:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        spec = model_spec(cfg.model, meta)
        net = build_model(spec)
        module = automatic_module(net, len(spec["classes"]), cfg, per_epoch_metrics)
        data = datamodule(cfg, train, val, steps_per_call=1)
        history = EpochHistory(None, quiet=True)
        trainer = build_trainer(cfg, [history], root_dir=None)
        trainer.fit(module, datamodule=data)
        module.net.cpu().eval()
    out["val_acc"], out["train_loss"] = history.rows[-1]["val/acc"], history.rows[-1]["train/loss"]
    out["epoch_s"] = [row["epoch_time_s"] for row in history.rows]
    out["global_step"] = int(trainer.global_step)
    return t["s"]


def run(
    repeats: int | None = None,
    quick: bool = False,
    threads: int = 1,
    epochs: int | None = None,
    data: str = "digits",
    model: str | None = None,
    n_synthetic: int | None = None,
    sides: tuple[str, ...] = SIDES,
) -> dict:
    repeats = repeats or (3 if quick else 7)
    epochs = epochs or (2 if quick else 4)
    key_n = [f"n{n_synthetic or 4_096}"] if data == SYNTHETIC else []
    subset = ["+".join(sides)] if set(sides) != set(SIDES) else []
    name = "-".join([data, *key_n, *([model] if model else []), *subset])  # this run's key in the record
    pin_threads(threads)
    quiet()
    cfg = bench_config(overrides(threads, epochs, data, "cpu", model))
    if data == SYNTHETIC:
        meta, train, val = synthetic_data(n_synthetic or 4_096, cfg.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-b1s-") as tmp:
            meta, train, val = prepare_data(Path(tmp), cfg)
    n = len(train.labels)
    ours8, ours1 = with_steps_per_call(cfg, 8), with_steps_per_call(cfg, 1)
    runners = {
        "raw": lambda out: train_raw(cfg, meta, train, val, out),
        "ours": lambda out: train_ours(ours8, meta, train, val, out),
        "ours1": lambda out: train_ours(ours1, meta, train, val, out),
        "automatic": lambda out: train_automatic(cfg, meta, train, val, out),
        "auto_epoch": lambda out: train_automatic(cfg, meta, train, val, out, per_epoch_metrics=True),
        "ours_public": lambda out: train_ours(ours8, meta, train, val, out, callbacks=[hook_listener()]),
    }
    if "raw" not in sides:
        sides = ("raw", *sides)
    last: dict[str, dict[str, Any]] = {side: {} for side in sides}
    steady: dict[str, list[float]] = {side: [] for side in sides}
    cpu: dict[str, list[float]] = {side: [] for side in sides}  # process CPU seconds of the same call

    def timed(side: str) -> float:
        start = time.process_time()
        seconds = runners[side](last[side])
        cpu[side].append(time.process_time() - start)
        steady[side].append(median(last[side]["epoch_s"][1:] or last[side]["epoch_s"]))
        return seconds

    samples = interleaved({side: (lambda side=side: timed(side)) for side in sides}, repeats, warmup=1, label=name)
    steady = {side: values[-repeats:] for side, values in steady.items()}  # drop the warm-up
    cpu = {side: values[-repeats:] for side, values in cpu.items()}
    table: dict[str, dict[str, Any]] = {}
    for side in sides:
        if side == "raw":
            continue
        whole = paired_ratios(samples["raw"], samples[side])  # side/raw throughput = raw s / side s
        epoch = paired_ratios(steady["raw"], steady[side])
        on_cpu = paired_ratios(cpu["raw"], cpu[side])
        table[side] = {
            "throughput_vs_raw": spread(whole),
            "steady_epoch_vs_raw": spread(epoch),
            "per_repeat_throughput_vs_raw": whole,
            "per_repeat_steady_vs_raw": epoch,
            "cpu_time_vs_raw": spread(on_cpu),
            "per_repeat_cpu_time_vs_raw": on_cpu,
            "cpu_s": spread(cpu[side]),
            "fit_s": spread(samples[side]),
            "epoch_s": spread(steady[side]),
        }
        print(
            f"[{name}] {side:>10}/raw  whole fit {median(whole):.3f} [{min(whole):.3f}-{max(whole):.3f}]"
            f"  per epoch {median(epoch):.3f} [{min(epoch):.3f}-{max(epoch):.3f}]"
            f"  cpu time {median(on_cpu):.3f} [{min(on_cpu):.3f}-{max(on_cpu):.3f}]",
            flush=True,
        )
    headline = {side: table[side]["throughput_vs_raw"]["median"] for side in table}
    entry = {
        "what": f"{cfg.model.name} on {'augmented ' if data == 'digits' else ''}{data} ({n} img, "
        f"{'x'.join(map(str, train.images.shape[1:]))}), bs {cfg.data.batch_size}, {epochs} epochs incl. "
        f"validation, cpu {threads} thread(s)",
        "throughput_vs_raw_median": headline,
        "sides": table,
        "raw_fit_s": spread(samples["raw"]),
        "raw_epoch_s": spread(steady["raw"]),
        "raw_cpu_s": spread(cpu["raw"]),
        "fit_s_per_repeat": samples,
        "cpu_s_per_repeat": cpu,
        "cpu_note": "time.process_time() around the same call (this process's CPU seconds): less sensitive than "
        "wall time to other processes on the shared machine",
        "repeats": repeats,
        "warmup": 1,
        "epochs_per_run": epochs,
        "threads": threads,
        "train_images": n,
        "val_images": len(val.labels),
        "batch_size": cfg.data.batch_size,
        "model": cfg.model.name,
        "optimizer": f"{cfg.optim.name} lr={cfg.optim.lr} + {cfg.optim.scheduler}",
        "label_smoothing": cfg.train.label_smoothing,
        "seed": cfg.seed,
        "quick": quick,
        "sanity_last_repeat": last,
    }
    path = RESULTS / f"{NAME}.json"
    by_data = json.loads(path.read_text())["details"]["by_data"] if path.exists() else {}
    by_data[name] = entry
    record = make_result(
        name=NAME,
        title="B1 step modes: steps_per_call / direct step vs automatic optimisation",
        what="side/raw throughput per data set, interleaved: "
        + "; ".join(f"{key}: {e['what']}" for key, e in by_data.items()),
        ours="; ".join(
            f"{key}: " + ", ".join(f"{s} {v:.3f}" for s, v in e["throughput_vs_raw_median"].items())
            for key, e in by_data.items()
        ),
        baseline="raw loop = 1",
        ratio=headline.get("ours"),
        ratio_label=f"ours/raw throughput ({name}, the last run)",
        goal_op=">=",
        goal=0.97,
        threads=threads,
        quick=quick,
        details={"unit": "side/raw throughput (raw seconds / side seconds, paired per repeat)", "by_data": by_data},
    )
    record["table"] = False
    write_result(record)
    return record


def _options(parser: Any) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run")
    parser.add_argument("--data", default="digits", help="digits | mnist5k | cifar-synthetic")
    parser.add_argument("--model", default=None, help="model config (default cnn; resnet_small for cifar-synthetic)")
    parser.add_argument("--n", type=int, default=None, help="cifar-synthetic training images (default 4096)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {','.join(SIDES + EXTRA_SIDES)}")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    sides = tuple(s for s in args.sides.split(",") if s)
    unknown = set(sides) - set(SIDES) - set(EXTRA_SIDES)
    if unknown:
        raise SystemExit(f"unknown sides: {sorted(unknown)}")
    run(args.repeats, args.quick, args.threads, args.epochs, args.data, args.model, args.n, sides)


if __name__ == "__main__":
    main()
