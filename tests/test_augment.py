"""Augmentation ops and in-memory batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnpipe.config import AugmentConfig, load_config
from cnnpipe.data.augment import (
    augment_batch,
    augment_copies,
    brightness_contrast,
    gaussian_noise,
    random_affine,
    random_erase,
    random_hflip,
    to_float,
    to_uint8,
)
from cnnpipe.data.batches import IndexBatches, TensorBatches
from tests.helpers import ROOT
from tests.tiny import conf_section

Op = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

OPS: dict[str, Op] = {
    "affine": lambda x, g: random_affine(x, 20.0, 0.15, (0.8, 1.2), g),
    "hflip": lambda x, g: random_hflip(x, g),
    "brightness_contrast": lambda x, g: brightness_contrast(x, 0.2, 0.3, g),
    "noise": lambda x, g: gaussian_noise(x, 0.1, g),
    "erase": lambda x, g: random_erase(x, 0.7, (0.05, 0.2), g),
}

# The same ops as configs for augment_batch, every other op switched off.
NONE = conf_section(
    "augment",
    copies=0,
    rotate=0.0,
    translate=0.0,
    scale=[1.0, 1.0],
    hflip=False,
    brightness=0.0,
    contrast=0.0,
    noise_std=0.0,
    erase_prob=0.0,
)
ONLY: dict[str, AugmentConfig] = {
    "affine": replace(NONE, rotate=20.0, translate=0.15, scale=[0.8, 1.2]),
    "hflip": replace(NONE, hflip=True),
    "brightness_contrast": replace(NONE, brightness=0.2, contrast=0.3),
    "noise": replace(NONE, noise_std=0.1),
    "erase": replace(NONE, erase_prob=0.7, erase_area=[0.05, 0.2]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread: tiny tensors, a busy machine


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 8, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1] with structure (a bright bar) so flips and shifts change them."""
    x = torch.rand(n, c, size, size, generator=gen(seed)) * 0.5
    x[:, :, size // 4 : size // 2, 1 : size // 3] = 1.0
    return x


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("channels", [1, 3])
def test_op_keeps_shape_and_dtype(name: str, channels: int) -> None:
    x = batch(c=channels)
    y = OPS[name](x, gen(0))
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["affine", "hflip", "erase"])
def test_op_keeps_range(name: str) -> None:
    y = OPS[name](batch(), gen(0))
    assert y.min() >= 0.0 and y.max() <= 1.0


@pytest.mark.parametrize("name", ONLY)
def test_augment_batch_keeps_shape_dtype_range(name: str) -> None:
    x = batch(n=16, c=3)
    y = augment_batch(x, ONLY[name], gen(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", OPS)
def test_op_is_seeded(name: str) -> None:
    x = batch()
    a, b, c = OPS[name](x, gen(3)), OPS[name](x, gen(3)), OPS[name](x, gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_op_does_not_modify_its_input() -> None:
    x = batch()
    before = x.clone()
    for op in OPS.values():
        op(x, gen(0))
    augment_batch(x, conf_section("augment", erase_prob=1.0, hflip=True), gen(0))
    assert torch.equal(x, before)


def test_affine_with_zero_strength_is_identity() -> None:
    x = batch()
    assert torch.allclose(random_affine(x, 0.0, 0.0, (1.0, 1.0), gen(0)), x, atol=1e-5)


def test_affine_translate_only_moves_content() -> None:
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 6:10, 6:10] = 1.0
    y = random_affine(x, 0.0, 0.25, (1.0, 1.0), gen(1))
    assert y.sum().item() == pytest.approx(16.0, abs=0.5)  # the square stays inside: mass kept
    assert not torch.allclose(y, x)


def centre_of_mass(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) row and column centre of mass of (N, 1, H, W) images."""
    h, w = x.shape[-2:]
    mass = x.sum(dim=(1, 2, 3))
    rows = (x.sum(dim=(1, 3)) * torch.arange(h)).sum(1) / mass
    cols = (x.sum(dim=(1, 2)) * torch.arange(w)).sum(1) / mass
    return torch.stack([rows, cols], 1)


def test_affine_translate_shifts_rows_and_columns_independently() -> None:
    size, translate = 32, 0.2
    x = torch.zeros(16, 1, size, size)
    x[:, 0, 13:19, 13:19] = 1.0
    shift = centre_of_mass(random_affine(x, 0.0, translate, (1.0, 1.0), gen(2))) - centre_of_mass(x)
    assert shift.abs().max() <= translate * size + 0.5
    assert shift.abs().max() > translate * size / 4  # it does move
    assert (shift[:, 0] - shift[:, 1]).abs().max() > 1.0  # rows and columns drawn separately
    assert shift[:, 0].std() > 0.5 and shift[:, 1].std() > 0.5  # per-image amounts


def test_affine_rotate_and_scale_keep_the_centre() -> None:
    x = torch.zeros(8, 1, 32, 32)
    x[:, 0, 10:22, 14:18] = 1.0  # a vertical bar through the centre
    for y in (random_affine(x, 45.0, 0.0, (1.0, 1.0), gen(0)), random_affine(x, 0.0, 0.0, (0.7, 1.3), gen(0))):
        assert torch.allclose(centre_of_mass(y), centre_of_mass(x), atol=0.3)
        assert not torch.allclose(y, x, atol=0.05)


def test_hflip_gives_original_or_mirror() -> None:
    x = batch(n=32)
    y = random_hflip(x, gen(0))
    same = [torch.equal(y[i], x[i]) for i in range(32)]
    mirrored = [torch.equal(y[i], x[i].flip(-1)) for i in range(32)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def test_brightness_only_shifts_each_image_by_a_constant() -> None:
    x = batch(n=16)
    y = brightness_contrast(x, 0.2, 0.0, gen(0))
    shift = (y - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-6)
    assert shift.abs().max() <= 0.2 + 1e-6
    assert shift[:, 0].std() > 0  # per-image amounts


def test_contrast_only_keeps_each_image_mean() -> None:
    x = batch(n=16)
    y = brightness_contrast(x, 0.0, 0.5, gen(0))
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5)
    assert not torch.allclose(y, x)


def test_gaussian_noise_std() -> None:
    x = torch.full((64, 1, 16, 16), 0.5)
    diff = gaussian_noise(x, 0.05, gen(0)) - x
    assert diff.std().item() == pytest.approx(0.05, rel=0.05)
    assert diff.mean().abs().item() < 0.005


@pytest.mark.parametrize(("low", "high"), [(0.1, 0.2), (0.02, 0.05), (0.3, 0.3)])
def test_random_erase_zeroes_one_rectangle(low: float, high: float) -> None:
    n, size = 32, 32
    x = 0.1 + 0.9 * torch.rand(n, 2, size, size, generator=gen(0))  # no zeros anywhere
    y = random_erase(x, 1.0, (low, high), gen(1))
    assert torch.equal(y[:, 0] == 0, y[:, 1] == 0)  # the same rectangle in every channel
    for i in range(n):
        zero = (y[i, 0] == 0).nonzero()
        assert len(zero) > 0
        (r0, c0), (r1, c1) = zero.min(0).values.tolist(), zero.max(0).values.tolist()
        box = (r1 - r0 + 1) * (c1 - c0 + 1)
        assert box == len(zero)  # the zeros fill their bounding box: one rectangle
        assert low * 0.75 <= box / size**2 <= high * 1.3
        outside = y[i, 0] != 0
        assert torch.equal(y[i, 0][outside], x[i, 0][outside])


def test_random_erase_probability() -> None:
    x = 0.1 + 0.9 * torch.rand(200, 1, 16, 16, generator=gen(0))
    assert torch.equal(random_erase(x, 0.0, (0.1, 0.2), gen(0)), x)
    erased = (random_erase(x, 0.5, (0.1, 0.2), gen(0)) == 0).flatten(1).any(1).float().mean().item()
    assert 0.35 < erased < 0.65


def test_identity_settings_leave_images_unchanged() -> None:
    cfg = load_config(["augment=none"], root=ROOT).augment
    assert cfg.copies == 0
    x = batch(n=8, c=3)
    assert torch.equal(augment_batch(x, cfg, gen(0)), x)
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(10) % 3
    out, out_labels = augment_copies(images, labels, cfg, seed=0)
    assert np.array_equal(out, images) and np.array_equal(out_labels, labels)
    # copies with every op off are exact copies (uint8 -> float -> uint8 is lossless)
    out, out_labels = augment_copies(images, labels, replace(cfg, copies=2), seed=0)
    assert np.array_equal(out, np.concatenate([images] * 3))
    assert np.array_equal(out_labels, np.tile(labels, 3))


def test_uint8_float_round_trip() -> None:
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = to_float(u)
    assert f.dtype == torch.float32 and f.min() == 0 and f.max() == 1
    assert torch.equal(to_uint8(f), u)
    assert to_uint8(torch.tensor([-0.5, 1.7])).tolist() == [0, 255]


def test_augment_copies() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 1, 10, 10), dtype=np.uint8)
    labels = rng.integers(0, 4, 12).astype(np.int64)
    cfg = conf_section("augment", copies=3)
    out, out_labels = augment_copies(images, labels, cfg, seed=1)
    assert out.shape == (48, 1, 10, 10) and out.dtype == np.uint8
    assert np.array_equal(out_labels, np.tile(labels, 4)) and out_labels.dtype == labels.dtype
    assert np.array_equal(out[:12], images)  # originals first
    for k in range(1, 4):
        assert not np.array_equal(out[12 * k : 12 * (k + 1)], images)
    assert not np.array_equal(out[12:24], out[24:36])  # each copy is drawn afresh
    again, _ = augment_copies(images, labels, cfg, seed=1)
    assert np.array_equal(again, out)
    other, _ = augment_copies(images, labels, cfg, seed=2)
    assert np.array_equal(other[:12], images) and not np.array_equal(other, out)


def test_augment_copies_in_chunks_keeps_shape() -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    out, labels = augment_copies(images, np.arange(10), conf_section("augment", copies=2), seed=0, chunk=3)
    assert out.shape == (30, 3, 8, 8)
    assert np.array_equal(out[:10], images)
    assert labels.tolist() == list(range(10)) * 3


# --- TensorBatches ------------------------------------------------------------------------------


def make_batches(n: int = 23, batch_size: int = 5, **kw) -> TensorBatches:
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorBatches(images, torch.arange(n), IndexBatches(n, batch_size, **kw))


def epoch_labels(batches: TensorBatches) -> list[torch.Tensor]:
    return [y for _, y in batches]


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_index_once(shuffle: bool) -> None:
    b = make_batches(shuffle=shuffle, seed=3)
    for _ in range(3):
        seen = torch.cat(epoch_labels(b))
        assert sorted(seen.tolist()) == list(range(23))


def test_batches_yield_float_images_matching_labels() -> None:
    b = make_batches(shuffle=True)
    for x, y in b:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 2, 2)
        assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())


def test_unshuffled_batches_keep_order() -> None:
    b = make_batches(shuffle=False)
    assert epoch_labels(b)[0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(torch.cat(epoch_labels(b)), torch.arange(23))


def test_shuffle_differs_between_epochs_and_is_seeded() -> None:
    a, b = make_batches(shuffle=True, seed=7), make_batches(shuffle=True, seed=7)
    a0, a1 = torch.cat(epoch_labels(a)), torch.cat(epoch_labels(a))
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, torch.cat(epoch_labels(b)))
    assert torch.equal(a1, torch.cat(epoch_labels(b)))
    a.index.set_epoch(0)
    assert torch.equal(torch.cat(epoch_labels(a)), a0)
    assert not torch.equal(a0, torch.cat(epoch_labels(make_batches(shuffle=True, seed=8))))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_get_disjoint_shards(world_size: int, shuffle: bool) -> None:
    n = 23
    shards = []
    for rank in range(world_size):
        b = make_batches(n, shuffle=shuffle, seed=1, rank=rank, world_size=world_size)
        labels = torch.cat(epoch_labels(b)).tolist()
        assert len(labels) == len(set(labels))
        shards.append(set(labels))
    union = set().union(*shards)
    assert sum(len(s) for s in shards) == len(union)  # disjoint
    if shuffle:  # equal shard sizes: the remainder is dropped
        assert len({len(s) for s in shards}) == 1
        assert len(union) == n - n % world_size
    else:  # evaluation: every sample exactly once
        assert union == set(range(n))


def test_a_rank_takes_every_world_size_th_sample() -> None:
    full = make_batches(shuffle=False)
    part = make_batches(shuffle=False, rank=1, world_size=2)
    assert torch.cat(epoch_labels(part)).tolist() == torch.cat(epoch_labels(full)).tolist()[1::2]


@pytest.mark.parametrize("n", [1, 9, 10, 11, 23])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_len_matches_yielded_batches(n: int, drop_last: bool, shuffle: bool, rank: int, world_size: int) -> None:
    b = make_batches(n, batch_size=5, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size)
    batches = epoch_labels(b)
    assert len(b) == len(batches)
    if drop_last:
        assert all(len(y) == 5 for y in batches)


def test_drop_last() -> None:
    kept = epoch_labels(make_batches(23, batch_size=5, shuffle=True, drop_last=True))
    assert [len(y) for y in kept] == [5, 5, 5, 5]
    ragged = epoch_labels(make_batches(23, batch_size=5, shuffle=True, drop_last=False))
    assert [len(y) for y in ragged] == [5, 5, 5, 5, 3]


@pytest.mark.parametrize("per_call", [1, 2, 3, 10])
@pytest.mark.parametrize(("n", "drop_last"), [(23, False), (23, True), (20, False), (1, False)])
def test_steps_per_call_hands_over_consecutive_batches(per_call: int, n: int, drop_last: bool) -> None:
    """A call holds `per_call` batches back to back: split into batch_size pieces they are exactly the
    batches of one step per call, in order, and the step count per epoch does not change."""
    one = make_batches(n, batch_size=5, shuffle=True, seed=2, drop_last=drop_last)
    grouped = make_batches(n, batch_size=5, shuffle=True, seed=2, drop_last=drop_last, steps_per_call=per_call)
    calls = epoch_labels(grouped)
    assert len(grouped) == len(calls) == -(-len(one) // per_call)
    assert grouped.steps_per_epoch == one.steps_per_epoch == len(one)
    assert all(len(y) <= 5 * per_call for y in calls)
    steps = [piece for y in calls for piece in y.split(5)]
    assert [s.tolist() for s in steps] == [s.tolist() for s in epoch_labels(one)]


@pytest.mark.parametrize("copies", [0, 2])
def test_augment_stage_streams_a_memory_mapped_split_to_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copies: int
) -> None:
    """write_augmented reads the prepared split as a memory map and writes chunk by chunk (chunks of 4 here):
    the file holds augment_copies' images and labels."""
    from cnnpipe.data.augment import augmented_chunks
    from cnnpipe.data.store import Split, load_split, save_split
    from cnnpipe.stages import augment as augmented

    cfg = load_config([f"augment.copies={copies}", "augment.preview=6"], root=ROOT)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    labels = (np.arange(10) % 3).astype(np.int64)
    (tmp_path / cfg.paths.prepared).mkdir(parents=True)
    save_split(tmp_path / cfg.paths.prepared / "train.npz", Split(images, labels))
    monkeypatch.setattr(augmented, "augmented_chunks", lambda x, c, seed: augmented_chunks(x, c, seed=seed, chunk=4))
    assert augmented.write_augmented(cfg, tmp_path) == 10 * (copies + 1)
    got = load_split(tmp_path / cfg.paths.augmented / "train.npz")
    want, want_labels = augment_copies(images, labels, cfg.augment, seed=cfg.seed, chunk=4)
    assert np.array_equal(got.images, want) and np.array_equal(got.labels, want_labels)
    assert (tmp_path / cfg.paths.augmented / "preview.png").is_file()  # its content: tests/test_preview.py


def test_write_split_refuses_chunks_that_do_not_add_up(tmp_path: Path) -> None:
    from cnnpipe.data.store import write_split

    chunk = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="3 announced"):
        write_split(tmp_path / "s.npz", (3, 1, 4, 4), [chunk], np.zeros(3))
    with pytest.raises(ValueError, match="a chunk of shape"):
        write_split(tmp_path / "s.npz", (2, 1, 5, 5), [chunk], np.zeros(2))
