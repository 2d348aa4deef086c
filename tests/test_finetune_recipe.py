"""The fine-tuning recipe: parameter groups (backbone lr, no decay on norms and biases), OneCycle per group,
gradient accumulation, EMA weights, MixUp, per-image online augmentation and a frozen pretrained backbone.

Each check is against an independent computation where one exists: a hand-written EMA, a plain OneCycleLR, the
run without accumulation on the same samples, ops whose effect can be read back row by row."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from cnnpipe.data.online_augment import OnlineAugment, PerImagePolicy, online_augment
from cnnpipe.data.store import Split
from cnnpipe.models.factory import build_model, model_spec
from cnnpipe.models.transfer import backbone_modules, head_module
from cnnpipe.training.fit import fit, mixup
from cnnpipe.training.optimizers import parameter_groups
from tests.tiny import conf_defaults, conf_section, photo_data, tiny_data
from tests.tiny import tiny_config as config

pytestmark = pytest.mark.usefixtures("one_thread")

TIMM_RESNET = "test_resnet.r160_in1k"  # timm's tiny test networks: no download (pretrained=false or a file)
TIMM_CONVNEXT = "test_convnext.r160_in1k"
TIMM = ["model=timm", "model.pretrained=false", "model.freeze_epochs=0", "data.channels=3", "data.image_size=20"]


# ---------------------------------------------------------------------------------------------------- helpers


def net_for(*overrides: str) -> nn.Module:
    """The network `fit` would build for these overrides (timm ones get the RGB photo meta)."""
    cfg = config(*overrides)
    meta = photo_data(3)[0] if cfg.model.name == "timm" else tiny_data(3)[0]
    torch.manual_seed(0)
    return build_model(model_spec(cfg.model, meta))


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in state.values()])


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def online_cfg(**changes: Any) -> Any:
    """augment.online from conf/ (the committed defaults) with `changes`."""
    return dataclasses.replace(conf_defaults().augment.online, **changes)


class AfterEachStep(Callback):
    """With trainer.steps_per_call=1 every training batch is one optimiser step: record what `record` returns
    after each (and once at the start of the fit)."""

    def __init__(self, record) -> None:
        self.record = record
        self.start: Any = None
        self.steps: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self.record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(self.record(trainer, pl_module))


# ------------------------------------------------------------------------------ 0. fit on cnnpipe's own families


def test_fit_builds_a_cnnpipe_family() -> None:
    """fit asks for pretrained weights only where the config does: cnnpipe's own builders take no `pretrained`."""
    meta, train, val = tiny_data(32)
    result = fit(config("model=cnn", "train.epochs=1"), meta, train, val, ckpt_dir=None, quiet=True)
    assert result.trainer.global_step == 2


# ---------------------------------------------------------------------------------------- 1. parameter groups


@pytest.mark.parametrize("decay_norm_bias", [False, True], ids=["no-decay-1d", "decay-all"])
@pytest.mark.parametrize(
    "overrides",
    [["model=cnn"], ["model=cnn_bn"], [*TIMM, f"model.arch={TIMM_RESNET}"]],
    ids=["cnn", "cnn_bn", "timm-resnet"],
)
def test_parameter_groups_split_head_backbone_and_decay(overrides: list[str], decay_norm_bias: bool) -> None:
    net = net_for(*overrides)
    # the classifier, found independently of cnnpipe's head_module: cnnpipe's `head`, timm's own get_classifier()
    head = net.net.get_classifier() if hasattr(net, "net") else net.head
    head_ids = {id(p) for p in head.parameters()}
    optim = conf_section("optim", weight_decay=0.05, backbone_lr=0.1, decay_norm_bias=decay_norm_bias)
    lr = 0.02  # not optim.lr: the groups take the (possibly scaled) lr they are given
    groups = parameter_groups(net, optim, lr)

    counts = Counter(id(p) for g in groups for p in g["params"])
    named = dict(net.named_parameters())
    assert set(counts) == {id(p) for p in named.values()}, "a parameter is in no group"
    assert set(counts.values()) == {1}, "a parameter is in two groups"
    assert all(g["params"] for g in groups), "an empty group"

    by_id = {id(p): g for g in groups for p in g["params"]}
    kinds = Counter()
    for name, p in named.items():
        in_head = id(p) in head_ids
        g = by_id[id(p)]
        assert g["lr"] == pytest.approx(lr if in_head else lr * 0.1), name
        decays = decay_norm_bias or p.ndim >= 2
        assert g["weight_decay"] == (0.05 if decays else 0.0), name
        kinds[(in_head, p.ndim >= 2)] += 1
    # every kind of parameter is there, so each rule above was exercised
    assert set(kinds) == {(True, True), (True, False), (False, True), (False, False)}
    if "model=cnn_bn" in overrides or "model=timm" in overrides:
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(by_id[id(m.weight)]["weight_decay"] == (0.05 if decay_norm_bias else 0.0) for m in norms)


def test_a_nested_convnext_head_is_its_classifier_and_its_norm_is_backbone() -> None:
    net = net_for(*TIMM, f"model.arch={TIMM_CONVNEXT}")
    timm_net = net.net
    assert head_module(net) is timm_net.head.fc
    backbone = backbone_modules(net)
    ids = {id(m) for m in backbone}
    assert id(timm_net.head.norm) in ids and id(timm_net.stem) in ids and id(timm_net.stages) in ids
    assert not any(sub is timm_net.head.fc for m in backbone for sub in m.modules()), "the classifier is frozen too"
    assert not any(m is net.normalize for m in backbone)
    # backbone + head cover every parameter, once
    covered = Counter(id(p) for m in [*backbone, timm_net.head.fc] for p in m.parameters())
    assert set(covered) == {id(p) for p in net.parameters()} and set(covered.values()) == {1}
    # the head's norm trains at the backbone's lr, its classifier at the full lr
    optim = conf_section("optim", weight_decay=0.05, backbone_lr=0.1, decay_norm_bias=False)
    by_id = {id(p): g for g in parameter_groups(net, optim, 0.02) for p in g["params"]}
    assert by_id[id(timm_net.head.norm.weight)]["lr"] == pytest.approx(0.002)
    assert by_id[id(timm_net.head.fc.weight)]["lr"] == pytest.approx(0.02)
    assert by_id[id(timm_net.head.fc.bias)]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------- 2. OneCycle per group


def test_onecycle_keeps_the_backbone_lr_a_fraction_of_the_heads() -> None:
    meta, train, val = tiny_data(64)  # batch 16: 4 steps per epoch, 8 in all

    def lrs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list[float], list[float]]:
        head_ids = {id(p) for p in pl_module.net.head.parameters()}
        groups = trainer.optimizers[0].param_groups
        head = [g["lr"] for g in groups if id(g["params"][0]) in head_ids]
        backbone = [g["lr"] for g in groups if id(g["params"][0]) not in head_ids]
        return head, backbone

    seen = AfterEachStep(lrs)
    cfg = config("train.epochs=2", "trainer.steps_per_call=1", "optim.backbone_lr=0.1", "optim.scheduler=onecycle")
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True, callbacks=[seen])
    assert result.trainer.global_step == 8 and len(seen.steps) == 8
    # a plain OneCycleLR with the head's max_lr over the same 8 steps: the head group follows it exactly
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    reference = torch.optim.lr_scheduler.OneCycleLR(probe, max_lr=cfg.optim.lr, total_steps=8)
    expected = []
    for _ in range(8):
        probe.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    for (head, backbone), want in zip(seen.steps, expected, strict=True):
        assert len(head) == 2 and len(backbone) == 2  # decay / no-decay groups of each
        assert head == pytest.approx([want, want], rel=1e-9)
        assert backbone == pytest.approx([0.1 * want, 0.1 * want], rel=1e-9)
    assert len({round(h[0], 12) for h, _ in seen.steps}) >= 6  # the schedule moved
    scheduler = result.trainer.lr_scheduler_configs[0].scheduler
    assert [g["max_lr"] for g in scheduler.optimizer.param_groups] == pytest.approx([0.01, 0.01, 0.001, 0.001])


# ------------------------------------------------------------------------------------ 3. gradient accumulation

PLAIN_SGD = [
    "model=cnn",
    "model.batch_norm=false",
    "model.dropout=0.0",
    "optim=sgd",
    "optim.momentum=0.0",
    "optim.nesterov=false",
    "optim.weight_decay=0.0",
    "optim.scheduler=none",
    "optim.lr=0.2",
    "train.epochs=1",
]


def test_accumulating_two_batches_is_one_step_on_twice_the_batch() -> None:
    """IndexBatches cuts the same seeded permutation into batches whatever the batch size, so batches 2k and 2k+1
    of size 8 are batch k of size 16: the accumulated (mean of two means) gradient is the big batch's."""
    meta, train, val = tiny_data(64)  # 8 batches of 8 = 4 of 16
    big = fit(config(*PLAIN_SGD, "data.batch_size=16"), meta, train, val, ckpt_dir=None, quiet=True)
    assert big.trainer.global_step == 4
    for per_call in (1, 3):  # 3: windows of two batches straddle Lightning iterations
        acc = fit(
            config(*PLAIN_SGD, "data.batch_size=8", "train.accumulate=2", f"trainer.steps_per_call={per_call}"),
            meta,
            train,
            val,
            ckpt_dir=None,
            quiet=True,
        )
        assert acc.trainer.global_step == 4, per_call  # optimiser steps, not batches
        torch.testing.assert_close(flat(acc.net.state_dict()), flat(big.net.state_dict()), rtol=1e-5, atol=1e-6)
    # and accumulation is not a no-op: eight steps of 8 land elsewhere
    small = fit(config(*PLAIN_SGD, "data.batch_size=8"), meta, train, val, ckpt_dir=None, quiet=True)
    assert small.trainer.global_step == 8
    assert not torch.allclose(flat(small.net.state_dict()), flat(big.net.state_dict()), atol=1e-4)


def accumulated_by_hand(cfg, train: Split, accumulate: int) -> dict[str, torch.Tensor]:
    """One epoch of plain SGD with gradient accumulation on fit's batches, each window's loss the mean over the
    batches it holds (timm's train.py: the last window of an epoch divides by its own size, not by accumulate)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    meta = tiny_data(3)[0]
    net = build_model(model_spec(cfg.model, meta))
    opt = torch.optim.SGD(net.parameters(), lr=cfg.optim.lr)
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(cfg.seed + 0))
    images = torch.from_numpy(train.images).float() / 255
    labels = torch.from_numpy(train.labels)
    batches = list(order.split(cfg.data.batch_size))
    for start in range(0, len(batches), accumulate):
        window = batches[start : start + accumulate]
        opt.zero_grad()
        for idx in window:
            (F.cross_entropy(net(images[idx]), labels[idx]) / len(window)).backward()
        opt.step()
    return net.state_dict()


def test_the_hand_written_accumulation_loop_matches_fit_on_whole_windows() -> None:
    """The reference loop below is fit's own training on whole windows (so the next test's difference is the
    last window's scaling, not the loop)."""
    meta, train, val = tiny_data(64)
    cfg = config(*PLAIN_SGD, "data.batch_size=8", "train.accumulate=2")
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True)
    expected = flat(accumulated_by_hand(cfg, train, 2))
    torch.testing.assert_close(flat(result.net.state_dict()), expected, rtol=1e-5, atol=1e-6)


def test_an_epochs_short_last_window_is_a_full_step() -> None:
    meta, train, val = tiny_data(40)  # 5 batches of 8: windows (8, 8), (8, 8), (8)
    cfg = config(*PLAIN_SGD, "data.batch_size=8", "train.accumulate=2")
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True)
    assert result.trainer.global_step == 3  # ceil(5 / 2): the short window steps too (this part holds)
    expected = flat(accumulated_by_hand(cfg, train, 2))
    torch.testing.assert_close(flat(result.net.state_dict()), expected, rtol=1e-5, atol=1e-6)


def test_accumulation_with_onecycle_sizes_the_schedule_in_optimiser_steps() -> None:
    """5 batches per epoch, accumulate 2: 3 optimiser steps per epoch (the short last window steps too); the
    schedule is sized for exactly the 6 steps of 2 epochs (OneCycleLR raises on a step past its end)."""
    meta, train, val = tiny_data(40)
    cfg = config("data.batch_size=8", "train.accumulate=2", "train.epochs=2", "optim.scheduler=onecycle")
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True)
    assert result.trainer.global_step == 6
    scheduler = result.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 6 and scheduler.last_epoch == 6


# ----------------------------------------------------------------------------------------------------- 4. EMA


def test_ema_weights_are_the_hand_computed_average_and_are_what_validation_sees() -> None:
    meta, train, val = tiny_data(48)  # batch 16: 3 steps per epoch
    seen = AfterEachStep(lambda trainer, pl_module: snapshot(pl_module.net))
    cfg = config("train.epochs=2", "train.ema=0.9", "trainer.steps_per_call=1")
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True, callbacks=[seen])
    assert result.trainer.global_step == 6 and len(seen.steps) == 6
    average = {k: v.double() for k, v in seen.start.items()}  # ModelEmaV3 starts from the initial weights
    for weights in seen.steps:
        average = {k: 0.9 * average[k] + 0.1 * weights[k].double() for k in average}
    torch.testing.assert_close(flat(result.net.state_dict()), flat(average), rtol=1e-5, atol=1e-6)

    module = result.trainer.lightning_module
    assert result.net is module.ema.module
    raw = module.net.cpu().eval()
    torch.testing.assert_close(flat(raw.state_dict()), flat(seen.steps[-1]))
    assert not torch.allclose(flat(raw.state_dict()), flat(result.net.state_dict()), atol=1e-4)

    # the last validation pass (after the last step) measured the average, not the raw weights
    x, y = torch.from_numpy(val.images).float() / 255, torch.from_numpy(val.labels)
    with torch.no_grad():
        ema_loss = F.cross_entropy(result.net.eval()(x), y).item()
        raw_loss = F.cross_entropy(raw(x), y).item()
    assert result.history[-1]["val/loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert abs(ema_loss - raw_loss) > 1e-3


# --------------------------------------------------------------------------------------------------- 5. MixUp


def test_mixup_trains_on_soft_targets_and_passes_an_odd_last_batch_as_is() -> None:
    meta, train, val = tiny_data(37)  # batch 8: 8, 8, 8, 8, 5 (not 1: the ragged batch is kept)
    targets: list[torch.Tensor] = []

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            loss = pl_module._loss

            def recording(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                targets.append(target.detach().clone())
                return loss(logits, target)

            pl_module._loss = recording

    cfg = config("data.batch_size=8", "train.epochs=1", "augment.online.mixup=0.2")
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True, callbacks=[Spy()])
    training = targets[:5]  # then the validation pass's (hard labels)
    assert [len(t) for t in training] == [8, 8, 8, 8, 5]
    for soft in training[:4]:
        assert soft.is_floating_point() and soft.shape == (8, 3)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert any(((t > 1e-6) & (t < 1 - 1e-6)).any() for t in training[:4]), "no batch was mixed"
    assert training[4].dtype == torch.int64 and training[4].shape == (5,)  # the odd batch: labels as they are
    assert math.isfinite(result.history[0]["train/loss"]) and math.isfinite(result.history[0]["val/loss"])
    # the guard matters: timm's Mixup refuses an odd batch
    with pytest.raises(AssertionError, match="even"):
        mixup(cfg, 3)(torch.rand(5, 1, 8, 8), torch.arange(5) % 3)


def test_mixup_folds_label_smoothing_into_its_targets() -> None:
    cfg = config("augment.online.cutmix=1.0", "train.label_smoothing=0.3")
    assert mixup(config(), 3) is None
    torch.manual_seed(0)
    _, soft = mixup(cfg, 3)(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert soft.min() >= 0.1 - 1e-6  # every class keeps at least smoothing / classes
    torch.testing.assert_close(soft.sum(1), torch.ones(4))


# --------------------------------------------------------------------------------------- 6. online augmentation


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
def test_online_augment_crops_to_the_input_size_within_range(channels: int, policy: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, channels, 24, 24)
    augment = online_augment(online_cfg(crop_scale=[0.08, 1.0], hflip=True, policy=policy), 20, seed=1)
    out = augment(x)
    assert out.shape == (6, channels, 20, 20)
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_online_augment_draws_per_image_and_a_seed_repeats_it() -> None:
    x = torch.rand(1, 3, 16, 16).expand(24, -1, -1, -1).contiguous()  # 24 copies of one image
    cfg = online_cfg(crop_scale=None, hflip=False, policy="trivialaugment")

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(0)  # kornia's magnitudes come from torch's generator, the op draws from the seed
        return OnlineAugment(cfg, 16, seed=seed)(x.clone())

    out = run(3)
    distinct = {tuple(row.flatten().mul(1e4).round().tolist()) for row in out}
    assert len(distinct) >= 4, "identical images came out alike: the batch shares its operations"
    torch.testing.assert_close(run(3), out)
    assert not torch.equal(run(4), out)


def test_a_full_crop_without_flip_or_policy_is_the_resized_image() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 3, 24, 24)
    out = online_augment(online_cfg(crop_scale=[1.0, 1.0], hflip=False, policy="none"), 20)(x)
    expected = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert online_augment(online_cfg(crop_scale=None, hflip=False, policy="none"), 20) is None


class AddAndRecord(nn.Module):
    """Adds `value`; records which rows it was given (their id / 1000 is pixel [1, 1] less pixel [0, 0], which holds
    only what the ops added)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.rows: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append((x[:, 0, 1, 1] - x[:, 0, 0, 0]).mul(1000).round().long().tolist())
        return x + self.value


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("ops", [1, 2])
def test_per_image_policy_applies_each_op_to_the_rows_that_drew_it(ops: int, channels: int) -> None:
    n, seed = 40, 7
    x = torch.zeros(n, channels, 4, 4)
    x[:, :, 1, 1] = torch.arange(n, dtype=torch.float32)[:, None] / 1000  # row ids (every channel: grey averages)
    small, large = AddAndRecord(0.01), AddAndRecord(0.1)
    out = PerImagePolicy([small, large], ops, seed=seed)(x)
    assert out.shape == x.shape
    # the draws, replayed: `ops` rounds of one uniform choice per image from the policy's own seeded generator
    gen = torch.Generator().manual_seed(seed)
    drawn = [torch.randint(2, (n,), generator=gen) for _ in range(ops)]
    for r, d in enumerate(drawn):
        assert small.rows[r] == (d == 0).nonzero().flatten().tolist()
        assert large.rows[r] == (d == 1).nonzero().flatten().tolist()
    added = sum(torch.where(d == 0, 0.01, 0.1) for d in drawn)
    expected = x + added[:, None, None, None]
    torch.testing.assert_close(out, expected)
    # each row got exactly `ops` operations, and both kinds occur
    steps = ((out - x)[:, 0, 0, 0] / 0.01).round().long()  # 1 per small, 10 per large
    assert all((s % 10) + (s // 10) == ops for s in steps.tolist())
    assert len(set(steps.tolist())) == ops + 1
    assert torch.equal(x[:, 0, 1, 1] * 1000, torch.arange(n, dtype=torch.float32))  # the input is left alone


# ------------------------------------------------------------------------- 7. frozen pretrained timm backbone


def test_freeze_backbone_on_a_pretrained_timm_network(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(5)
    source = timm.create_model(TIMM_RESNET, pretrained=False)  # 1000 classes: timm drops the head on loading
    weights = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), weights)
    saved = source.state_dict()

    meta, train, val = photo_data(36)

    class PerEpoch(Callback):
        def __init__(self) -> None:
            self.states: list[dict[str, torch.Tensor]] = []

        def on_fit_start(self, trainer, pl_module) -> None:
            self.states.append(snapshot(pl_module.net))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.states.append(snapshot(pl_module.net))

    per_epoch = PerEpoch()
    cfg = config(
        *TIMM,
        f"model.arch={TIMM_RESNET}",
        "model.pretrained=true",
        f"model.weights={weights}",
        "model.freeze_epochs=1",
        "train.epochs=2",
        "data.batch_size=12",
    )
    result = fit(cfg, meta, train, val, ckpt_dir=None, quiet=True, callbacks=[per_epoch])
    start, first, second = per_epoch.states
    backbone = [k for k in start if k.startswith("net.") and not k.startswith("net.fc.")]
    params = {name for name, _ in result.net.named_parameters()}
    backbone_params = [k for k in backbone if k in params]
    assert backbone_params and all(torch.equal(start[k], saved[k.removeprefix("net.")]) for k in backbone)

    # epoch 1: backbone (weights and BatchNorm statistics) untouched, the new head trained
    changed = [k for k in backbone if not torch.equal(first[k], start[k])]
    assert not changed, changed
    assert not torch.equal(first["net.fc.weight"], start["net.fc.weight"])
    # epoch 2: everything trains
    moved = [k for k in backbone_params if not torch.equal(second[k], first[k])]
    assert len(moved) == len(backbone_params), sorted(set(backbone_params) - set(moved))
    assert not torch.equal(second["net.fc.weight"], first["net.fc.weight"])
    assert all(p.requires_grad for p in result.trainer.lightning_module.net.parameters())
