"""`fit` on tiny in-memory data: the options that change how it runs, in-process (no DDP here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cnnpipe.config import load_config
from cnnpipe.data.store import Split
from cnnpipe.training.fit import fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_data(n: int = 60) -> tuple[dict, Split, Split]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    images = (rng.random((n, 1, 8, 8)) * 40).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 0, c * 2 : c * 2 + 2, :] = 220  # each class a bright band: learnable in a few epochs
    meta = {"image_shape": [1, 8, 8], "classes": ["a", "b", "c"], "mean": [0.2], "std": [0.3]}
    split = Split(images, labels.astype(np.int64))
    return meta, split, split


def config(*overrides: str):
    return load_config(
        ["train.hparams=params", "trainer.accelerator=cpu", "data.batch_size=16", "optim.lr=0.01", *overrides],
        root=ROOT,
    )


def test_fit_without_checkpoints_returns_the_final_net_and_history() -> None:
    meta, train, val = tiny_data()
    result = fit(config("train.epochs=4"), meta, train, val, ckpt_dir=None, quiet=True)
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
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
    assert keep_on_device("never", cpu, 10**12)  # on the CPU the data is in host memory either way
    assert keep_on_device("always", torch.device("cuda", 0), 10**15)
    assert not keep_on_device("never", torch.device("cuda", 0), 1)


def test_fit_with_data_kept_off_device() -> None:
    meta, train, val = tiny_data()
    result = fit(config("train.epochs=1", "data.on_device=never"), meta, train, val, ckpt_dir=None, quiet=True)
    assert len(result.history) == 1
