"""train.class_balance: the class-weighted loss (hard, smoothed and MixUp targets), the class-balanced sampler
(uniform classes, seeded per epoch, sharded per rank, `none` the old permutation), and fits that use them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from cnnpipe.data.augment import to_float
from cnnpipe.data.batches import IndexBatches
from cnnpipe.data.store import Split
from cnnpipe.errors import DataError
from cnnpipe.training.fit import balanced_loss_weights, class_weights, datamodule, fit
from cnnpipe.training.module import weighted_cross_entropy
from tests.tiny import tiny_config as config

pytestmark = pytest.mark.usefixtures("seeded_one_thread")

CLASSES = ["common", "rare"]
META = {"image_shape": [1, 8, 8], "classes": CLASSES, "num_classes": 2, "mean": [0.2], "std": [0.3]}


def ambiguous(n_common: int, n_rare: int, seed: int, both: tuple[float, float] = (0.3, 0.6)) -> Split:
    """1x8x8 images: `common` a bright band in rows 0-1, `rare` in rows 4-5; a fraction `both` of each class shows
    both bands (30 % of common, 60 % of rare). On the two-band images the best guess is common when the classes
    count as often as they occur (10:1 in training: 90 vs 18 two-band images), rare when they count equally
    (0.3 vs 0.6): rare's recall is 0.4 unbalanced and 1.0 balanced, whatever the seed (the band is learnt in a few
    epochs, as tests/tiny.py's)."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_common), np.ones(n_rare)].astype(np.int64)
    images = (rng.random((len(labels), 1, 8, 8)) * 40).astype(np.uint8)
    two = np.r_[np.arange(n_common) < round(both[0] * n_common), np.arange(n_rare) < round(both[1] * n_rare)]
    for i, c in enumerate(labels):
        images[i, 0, c * 4 : c * 4 + 2, :] = 220
        if two[i]:
            images[i, 0, (1 - c) * 4 : (1 - c) * 4 + 2, :] = 220
    return Split(images, labels)


# --- the weighted loss -------------------------------------------------------------------------


def test_class_weights_are_scikit_learns_balanced_weights() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.r_[np.zeros(50), np.ones(5), np.full(20, 2)].astype(np.int64)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    torch.testing.assert_close(class_weights(labels, 3), torch.tensor(expected, dtype=torch.float32))
    assert class_weights(labels, 3).tolist() == pytest.approx([75 / 150, 75 / 15, 75 / 60])


def logits_and_labels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return logits, torch.tensor([0, 0, 0, 1, 2, 0]), torch.tensor([0.5, 5.0, 1.25], dtype=torch.float64)


def by_hand(logits: torch.Tensor, targets: list[list[float]], weight: list[float]) -> float:
    """sum_i sum_c w_c t_ic (-log p_ic) / sum_i sum_c w_c t_ic, one term at a time."""
    num = den = 0.0
    for row, t in zip(logits.tolist(), targets, strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        for c, share in enumerate(t):
            num += weight[c] * share * (log_z - row[c])
            den += weight[c] * share
    return num / den


def test_weighted_loss_on_hard_labels_is_pytorchs_weighted_cross_entropy() -> None:
    logits, y, w = logits_and_labels()
    loss = weighted_cross_entropy(logits, y, w)
    assert torch.equal(loss, F.cross_entropy(logits, y, weight=w))
    assert loss.item() == pytest.approx(by_hand(logits, F.one_hot(y, 3).tolist(), w.tolist()), rel=1e-12)
    assert not torch.isclose(loss, F.cross_entropy(logits, y))  # the weights matter here


def test_weighted_loss_on_mixup_targets_weighs_each_class_share() -> None:
    """timm's mixed targets (lam of one class, 1 - lam of the flipped batch's, smoothing folded in): each class's
    share counts with its class's weight."""
    from timm.data.mixup import mixup_target

    logits, y, w = logits_and_labels()
    for smoothing in (0.0, 0.1):
        target = mixup_target(y, 3, lam=0.7, smoothing=smoothing).double()
        expected = by_hand(logits, target.tolist(), w.tolist())
        assert weighted_cross_entropy(logits, target, w).item() == pytest.approx(expected, rel=1e-12)
    # by hand for sample 3 (class 1 mixed with sample 2's class 0): its terms weigh 0.7 * 5.0 and 0.3 * 0.5
    one = weighted_cross_entropy(logits[3:4], mixup_target(y, 3, lam=0.7)[3:4].double(), w)
    log_p = torch.log_softmax(logits[3], 0)
    assert one.item() == pytest.approx(-(0.7 * 5.0 * log_p[1] + 0.3 * 0.5 * log_p[0]).item() / (0.7 * 5.0 + 0.3 * 0.5))


def test_weighted_loss_with_label_smoothing() -> None:
    """Hard labels with label smoothing eps: target (1 - eps) one-hot + eps / K, the same loss as timm's smoothed
    target of an unmixed batch (MixUp's odd last batch goes as hard labels)."""
    from timm.data.mixup import mixup_target

    logits, y, w = logits_and_labels()
    eps = 0.1
    smoothed = (F.one_hot(y, 3).double() * (1 - eps) + eps / 3).tolist()
    loss = weighted_cross_entropy(logits, y, w, label_smoothing=eps)
    assert loss.item() == pytest.approx(by_hand(logits, smoothed, w.tolist()), rel=1e-12)
    unmixed = mixup_target(y, 3, lam=1.0, smoothing=eps).double()  # timm builds it in float32
    assert loss.item() == pytest.approx(weighted_cross_entropy(logits, unmixed, w).item(), rel=1e-6)
    assert not math.isclose(loss.item(), weighted_cross_entropy(logits, y, w).item(), rel_tol=1e-3)


def test_a_class_missing_from_train_is_one_line() -> None:
    train = Split(np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, np.int64))
    assert balanced_loss_weights(config(), train, CLASSES) is None  # none: nothing to balance, nothing checked
    for setting in ("loss", "sampler"):
        with pytest.raises(DataError, match=rf"no images of class rare; train.class_balance={setting}"):
            balanced_loss_weights(config(f"train.class_balance={setting}"), train, CLASSES)


# --- the sampler -------------------------------------------------------------------------------

TEN_TO_ONE = torch.cat([torch.zeros(1000, dtype=torch.long), torch.ones(100, dtype=torch.long)])


def balanced(seed: int = 7, **kw) -> IndexBatches:
    return IndexBatches(len(TEN_TO_ONE), 32, shuffle=True, seed=seed, balance_labels=TEN_TO_ONE, **kw)


def test_the_sampler_draws_classes_equally_often() -> None:
    drawn = torch.cat([balanced(epoch_of=lambda e=e: e).order() for e in range(3)])
    assert len(drawn) == 3 * 1100  # an epoch keeps its length
    share = torch.bincount(TEN_TO_ONE[drawn], minlength=2) / len(drawn)
    assert share.tolist() == pytest.approx([0.5, 0.5], abs=0.03)  # unbalanced: 0.91 / 0.09
    assert set(drawn[TEN_TO_ONE[drawn] == 1].tolist()) == set(range(1000, 1100))  # every rare image, repeatedly
    assert len(torch.unique(drawn[TEN_TO_ONE[drawn] == 0])) > 700  # the common ones drawn too (~1 - e^-1.65)


def test_the_sampler_is_seeded_per_epoch() -> None:
    first = [balanced().order() for _ in range(2)]
    assert torch.equal(first[0], first[1])
    later = balanced()
    later.set_epoch(1)
    assert not torch.equal(later.order(), first[0])
    assert not torch.equal(balanced(seed=8).order(), first[0])
    # under a Trainer the epoch is the Trainer's
    assert torch.equal(balanced(epoch_of=lambda: 1).order(), later.order())


def test_ranks_take_strided_shards_of_one_draw() -> None:
    whole = balanced().order()
    shards = [balanced(rank=r, world_size=2).order() for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 550
    assert torch.equal(torch.stack(shards, 1).flatten(), whole)  # every position once, in the one draw's order


def test_none_keeps_the_old_permutation() -> None:
    """The default order is exactly `randperm(n)` seeded by seed + epoch, in fit's datamodule too: the
    committed baseline reproduces."""
    train = ambiguous(40, 4, 0)
    for index in (
        IndexBatches(44, 16, shuffle=True, seed=5),
        datamodule(config("seed=5"), train, train).train_dataloader().index,
    ):
        for epoch in range(3):
            index.set_epoch(epoch)
            old = torch.randperm(44, generator=torch.Generator().manual_seed(5 + epoch))
            assert torch.equal(index.order(), old)
    sampled = datamodule(config("seed=5", "train.class_balance=sampler"), train, train).train_dataloader().index
    assert not torch.equal(sampled.order(), torch.randperm(44, generator=torch.Generator().manual_seed(5)))
    assert datamodule(config("train.class_balance=sampler"), train, train).val_dataloader().index.balanced is None


@pytest.mark.parametrize("on_device", ["always", "never"])
def test_both_data_paths_draw_balanced_batches(on_device: str) -> None:
    """Held on the device or streamed by a DataLoader (whose batch sampler is the same IndexBatches): the same
    balanced batches."""
    train = ambiguous(200, 20, 0)
    cfg = config("train.class_balance=sampler", f"data.on_device={on_device}", "data.workers=0")
    labels = torch.cat([y for _, y in datamodule(cfg, train, train, steps_per_call=1).train_dataloader()])
    assert len(labels) == 220
    assert torch.bincount(labels).tolist() == [113, 107]  # the seeded draw; unbalanced: [200, 20]


# --- fits --------------------------------------------------------------------------------------


class Weights(Callback):
    """The class weights the module trains with."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.used = pl_module.class_weights


def rare_recall(net: torch.nn.Module, val: Split) -> float:
    with torch.no_grad():
        pred = net(to_float(torch.from_numpy(val.images))).argmax(1)
    return float((pred[torch.from_numpy(val.labels) == 1] == 1).float().mean())


def test_balancing_raises_the_rare_class_recall() -> None:
    """10:1 training set, balanced validation: rare's recall 0.4 without balancing, 1.0 with either option (the
    margin holds for seeds 0-4 and 4-6 epochs); val/loss stays the unweighted loss."""
    train, val = ambiguous(200, 20, 0), ambiguous(50, 50, 100)
    recall = {}
    for setting in ("none", "loss", "sampler"):
        seen = Weights()
        cfg = config("train.epochs=6", f"train.class_balance={setting}")
        result = fit(cfg, META, train, val, ckpt_dir=None, quiet=True, callbacks=[seen])
        recall[setting] = rare_recall(result.net, val)
        if setting == "loss":
            assert torch.equal(seen.used, class_weights(train.labels, 2))  # 220 / (2 * 200), 220 / (2 * 20)
            assert seen.used.tolist() == pytest.approx([0.55, 5.5])
        else:
            assert seen.used is None
        with torch.no_grad():  # the last validation ran on the final weights
            logits = result.net(to_float(torch.from_numpy(val.images)))
        labels = torch.from_numpy(val.labels)
        assert result.history[-1]["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert recall["none"] <= 0.5
    assert recall["loss"] >= 0.9 and recall["sampler"] >= 0.9


@pytest.mark.slow
def test_the_train_stage_logs_the_class_weights_it_used(tmp_path: Path) -> None:
    """The train stage on an imbalanced tiny set with class_balance=loss: the param says `loss`, the tag the
    weights; with hundreds of classes (past MLflow's 8000 characters for a tag) they go to an artifact."""
    from mlflow import MlflowClient

    from cnnpipe.data.store import save_split
    from cnnpipe.stages.train import run_training
    from cnnpipe.tracking.runs import tracked_run
    from cnnpipe.training.fit import CLASS_WEIGHTS_FILE, CLASS_WEIGHTS_TAG, log_class_balance

    prepared, augmented = tmp_path / "data" / "prepared", tmp_path / "data" / "augmented"
    prepared.mkdir(parents=True)
    augmented.mkdir(parents=True)
    train, val = ambiguous(60, 6, 0), ambiguous(10, 10, 1)
    save_split(augmented / "train.npz", train)
    save_split(prepared / "val.npz", val)
    (prepared / "meta.json").write_text(json.dumps(META))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config(
        "train.epochs=1",
        "train.class_balance=loss",
        "tracking.log_model=false",
        f"tracking.uri={uri}",
        "paths.prepared=data/prepared",
        "paths.augmented=data/augmented",
    )
    summary = run_training(cfg, tmp_path)
    run = MlflowClient(uri).get_run(summary["run_id"])
    assert run.data.params["train.class_balance"] == "loss"
    assert json.loads(run.data.tags[CLASS_WEIGHTS_TAG]) == {"common": 0.55, "rare": 5.5}  # 66 / (2 * 60), 66 / (2 * 6)

    many = [f"class_{i:04d}" for i in range(1000)]
    labels = np.arange(3000) % 1000
    labels[:500] = 0
    split = Split(np.zeros((3000, 1, 1, 1), np.uint8), labels)
    with tracked_run(uri, tmp_path, "many-classes", "many", {}) as logger:
        log_class_balance(logger, cfg, split, many)
    client = MlflowClient(uri)
    tags = client.get_run(logger.run_id).data.tags
    assert tags[CLASS_WEIGHTS_TAG].startswith("1000 classes, from class_0000:0.0059761 to class_0001:1.5;")
    logged = json.loads(Path(client.download_artifacts(logger.run_id, CLASS_WEIGHTS_FILE, str(tmp_path))).read_text())
    assert logged == dict(zip(many, class_weights(labels, 1000).tolist(), strict=True))
