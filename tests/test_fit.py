"""`fit` on tiny in-memory data: the options that change how it runs, in-process (no DDP here)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cnnpipe.training.fit import fit
from tests.tiny import tiny_config as config
from tests.tiny import tiny_data

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_without_checkpoints_returns_the_final_net_and_history() -> None:
    meta, train, val = tiny_data()
    result = fit(config("train.epochs=4"), meta, train, val, ckpt_dir=None, quiet=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert all({"train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro"} <= set(r) for r in result.history)
    assert result.history[-1]["train/loss"] < result.history[0]["train/loss"]
    assert result.best_score is None  # no checkpointing: nothing to pick a best from
    assert result.history[-1]["val/acc"] > 0.9


def test_fit_with_checkpoints_loads_the_best_epoch(tmp_path: Path) -> None:
    meta, train, val = tiny_data()
    result = fit(config("train.epochs=4"), meta, train, val, ckpt_dir=tmp_path, quiet=True)
    best = max(r["val/acc"] for r in result.history)
    assert result.best_score == pytest.approx(best)
    assert (tmp_path / "best.ckpt").is_file() and (tmp_path / "last.ckpt").is_file()


def test_channels_last_on_cpu_trains_the_same_net_shape(tmp_path: Path) -> None:
    meta, train, val = tiny_data()
    result = fit(config("train.epochs=2", "trainer.channels_last=on"), meta, train, val, ckpt_dir=None, quiet=True)
    out = result.net(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_a_rank_mismatch_is_refused_before_training() -> None:
    meta, train, val = tiny_data()
    with pytest.raises(RuntimeError, match="rank 1"):
        fit(config("train.epochs=1"), meta, train, val, ckpt_dir=None, quiet=True, expect_rank=1)


def test_data_placement_policy() -> None:
    from cnnpipe.data.datamodule import keep_on_device

    cpu = torch.device("cpu")
    assert keep_on_device("auto", cpu, 1)
    assert not keep_on_device("auto", cpu, 10**18)  # more than any host has: streamed
    assert not keep_on_device("never", cpu, 1)
    assert keep_on_device("always", torch.device("cuda", 0), 10**15)
    assert not keep_on_device("never", torch.device("cuda", 0), 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_data_trains_exactly_like_data_held_in_memory(tmp_path: Path, workers: int) -> None:
    """data.on_device=never: a DataLoader (worker processes re-mapping the .npz) feeds the same batches
    in the same order as the in-memory path, so the weights and metrics come out identical."""
    from cnnpipe.data.store import load_split, save_split
    from cnnpipe.data.streaming import LoaderBatches

    meta, train, val = tiny_data(70)
    save_split(tmp_path / "train.npz", train)
    mapped = load_split(tmp_path / "train.npz", mmap=True)
    assert isinstance(mapped.images, np.memmap)
    held = fit(config("train.epochs=2", "data.on_device=always"), meta, train, val, ckpt_dir=None, quiet=True)
    streamed = fit(
        config("train.epochs=2", "data.on_device=never", f"data.workers={workers}"),
        meta,
        mapped,
        val,
        ckpt_dir=None,
        quiet=True,
    )
    assert isinstance(streamed.trainer.train_dataloader, LoaderBatches)
    assert streamed.trainer.global_step == held.trainer.global_step == 2 * 5
    assert torch.equal(weights(streamed.net), weights(held.net))
    assert comparable(streamed.history) == comparable(held.history)


class CountsBackward(Callback):
    """Counts the per-step hook `on_after_backward`: every optimiser step must run Lightning's hooks."""

    def __init__(self) -> None:
        self.calls = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calls += 1


def weights(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in net.state_dict().values()])


def comparable(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in history]


@pytest.mark.parametrize(
    "overrides",
    [[], ["train.grad_clip=0.05"], ["optim=sgd", "optim.scheduler=cosine"], ["train.label_smoothing=0.1"]],
    ids=["adamw-onecycle", "grad-clip", "sgd-cosine", "label-smoothing"],
)
def test_several_steps_per_call_take_the_same_steps(overrides: list[str]) -> None:
    """steps_per_call only changes how many steps one Lightning iteration takes: the weights, the logged
    metrics and the step count are those of one step per iteration, and every step runs Lightning's per-step
    hooks (a callback on `on_after_backward` counts them)."""
    meta, train, val = tiny_data(70)  # batch 16: 5 steps per epoch, the last one of 6 images
    counter = CountsBackward()
    reference = fit(
        config("train.epochs=3", "trainer.steps_per_call=1", *overrides),
        meta,
        train,
        val,
        ckpt_dir=None,
        quiet=True,
        callbacks=[counter],
    )
    assert counter.calls == reference.trainer.global_step == 3 * 5
    for per_call in (2, 8):
        counter = CountsBackward()
        result = fit(
            config("train.epochs=3", f"trainer.steps_per_call={per_call}", *overrides),
            meta,
            train,
            val,
            ckpt_dir=None,
            quiet=True,
            callbacks=[counter],
        )
        assert counter.calls == result.trainer.global_step == 3 * 5
        assert result.trainer.num_training_batches == -(-5 // per_call)
        assert torch.equal(weights(result.net), weights(reference.net)), per_call
        assert comparable(result.history) == comparable(reference.history)


def test_train_metrics_are_the_epoch_means() -> None:
    """train/loss is the sample-weighted mean of the step losses, train/acc torchmetrics' (micro) accuracy over
    every training prediction of the epoch: recomputed from what a callback sees at each step."""
    from torchmetrics.functional.classification import multiclass_accuracy

    class Steps(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.sizes: list[int] = []
            self.preds: list[torch.Tensor] = []
            self.targets: list[torch.Tensor] = []
            self.last_logits: torch.Tensor | None = None

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            pl_module.net.register_forward_hook(self._keep)

        def _keep(self, module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
            if module.training:
                self.last_logits = out.detach()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            self.sizes.append(len(batch[1]))
            self.preds.append(self.last_logits.argmax(1))
            self.targets.append(batch[1])

    meta, train, val = tiny_data(70)
    steps = Steps()
    cfg = config("train.epochs=1", "trainer.steps_per_call=1", "model.dropout=0.5")
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True, callbacks=[steps])
    assert steps.sizes == [16, 16, 16, 16, 6]
    expected_loss = sum(loss * n for loss, n in zip(steps.losses, steps.sizes, strict=True)) / 70
    preds, targets = torch.cat(steps.preds), torch.cat(steps.targets)
    expected_acc = multiclass_accuracy(preds, targets, num_classes=3, average="micro").item()
    assert expected_acc == pytest.approx((preds == targets).float().mean().item())  # correct / all, as test acc
    assert result.history[0]["train/loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert result.history[0]["train/acc"] == pytest.approx(expected_acc, rel=1e-6)
    # validation ran on the final weights (one epoch): its metrics over the whole val split
    from torchmetrics.functional.classification import multiclass_f1_score

    with torch.no_grad():
        logits = result.net.eval()(torch.from_numpy(val.images).float() / 255)
    labels = torch.from_numpy(val.labels)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert result.history[0]["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert result.history[0]["val/acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    f1 = multiclass_f1_score(logits, labels, num_classes=3, average="macro").item()
    assert result.history[0]["val/f1_macro"] == pytest.approx(f1)


def test_each_epoch_sees_a_new_order_that_a_resume_repeats(tmp_path: Path) -> None:
    """The training order is a seeded permutation per epoch (from the trainer's epoch, not from counting
    passes): epochs differ, and a fit interrupted after two epochs and resumed sees epoch 3's order."""

    class Order(Callback):
        def __init__(self, stop_at: int | None = None) -> None:
            self.epochs: dict[int, list[bytes]] = {}
            self.stop_at = stop_at

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == self.stop_at:
                raise KeyboardInterrupt

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.epochs.setdefault(trainer.current_epoch, []).extend(x.numpy().tobytes() for x in batch[0])

    meta, train, val = tiny_data(70)
    cfg = config("train.epochs=3", "trainer.steps_per_call=1")
    full = Order()
    fit(cfg, meta, train, val, ckpt_dir=tmp_path / "full", quiet=True, callbacks=[full])
    assert len({tuple(v) for v in full.epochs.values()}) == 3
    assert all(sorted(v) == sorted(full.epochs[0]) for v in full.epochs.values())  # each a permutation
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, meta, train, val, ckpt_dir=tmp_path / "part", quiet=True, callbacks=[Order(stop_at=2)])
    resumed = Order()
    fit(
        cfg,
        meta,
        train,
        val,
        ckpt_dir=tmp_path / "part",
        quiet=True,
        callbacks=[resumed],
        resume_from=tmp_path / "part" / "last.ckpt",
    )
    assert list(resumed.epochs) == [2] and resumed.epochs[2] == full.epochs[2]


def test_a_tie_on_the_monitored_metric_goes_to_the_lower_val_loss(tmp_path: Path) -> None:
    """val/acc saturates at 1.0 on tiny data; the kept epoch is the lowest val/loss among the tied best."""
    meta, train, val = tiny_data()
    result = fit(config("train.epochs=10"), meta, train, val, ckpt_dir=tmp_path, quiet=True)
    top = max(r["val/acc"] for r in result.history)
    tied = [r for r in result.history if r["val/acc"] == top]
    assert len(tied) > 1, "the data should make val/acc tie, or this test checks nothing"
    expected = min(tied, key=lambda r: r["val/loss"])
    assert result.best_epoch == expected["epoch"]
    assert result.best_score == pytest.approx(top)
