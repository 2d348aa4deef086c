"""B1: training throughput of cnnpipe's train step vs a hand-written PyTorch loop.

Ours: `cnnpipe.training.fit.fit` with no checkpoint folder and no MLflow sink, i.e. the real `ImageClassifier`
in the real Lightning `Trainer` from `build_trainer`, fed by `InMemoryDataModule` / `TensorBatches`, with the
`EpochHistory` callback. Timed: the whole call (model + Trainer construction included, as on both sides).
Raw: the same net (`cnnpipe.models.factory.build_model`, same seed), the same optimiser and scheduler
(AdamW + OneCycleLR stepped per batch), the same batches (a seeded permutation per epoch indexing the same
uint8 tensor), the same per-epoch validation (loss + accuracy, inference mode) and running train loss/accuracy.
Both sides: digits with the default augmentation (original + 4 copies), batch size 64, same thread count.
`--data mnist5k` (28x28, augment=none) measures a bigger step; its result is B1-mnist5k (not in run_all).
`--data cifar-synthetic`: random uint8 3x32x32 images of 10 classes (CIFAR-10's size; 50,000 on a GPU, 4,096 on
the CPU, `--n` to change), `--model` (default resnet_small there): throughput does not depend on the pixels.
`--size N` sets the synthetic images' side (default 32). `--model timm --arch NAME` trains a timm network
(model=timm, pretrained=false: throughput does not depend on the weights, so freeze_epochs=0) built by cnnpipe's
`build_model` from the same spec on both sides; its result is B1-timm-ARCH-SIZEpx (B1-timm-resnet18-64px), and it
also times augment=photo's per-image augmentation (`OnlineAugment`) on one batch against one train step.
`--device cuda` runs both sides on the GPU with bf16 autocast (Lightning's bf16-mixed) and channels_last; its
result is B1-cuda (B1-cifar-synthetic-cuda, B1-timm-resnet50-224px-cuda, ...). Every record also gives the
model's training FLOPs per image (forward + backward, counted by torch.utils.flop_counter) and the achieved FLOP/s;
on a GPU with a known bf16 peak, the model FLOPs utilisation (MFU) against it. The raw loop's AdamW has cnnpipe's
parameter groups written out (no weight decay on 1-D tensors: `raw_groups`), so both sides make the same updates.

Run alone: python -m bench.b1_train_step [--quick] [--repeats N] [--threads N] [--epochs N] [--data NAME]
                                         [--device cpu|cuda] [--model NAME] [--arch TIMM_NAME] [--n N] [--size N]
e.g.       python -m bench.b1_train_step --data cifar-synthetic --model timm --arch resnet18 --size 64
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.timing import cli, interleaved, median, paired_ratios, pin_threads, result, spread, stopwatch, write_result
from bench.workspace import bench_config, prepare_data, quiet

NAME = "B1"
SYNTHETIC = "cifar-synthetic"
DEFAULT_ARCH = "resnet18"  # model=timm without --arch
# Dense bf16 tensor-core peaks (vendor data sheets, FLOP/s) by a name fragment of torch.cuda.get_device_name.
BF16_PEAK = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def overrides(
    threads: int,
    epochs: int,
    data: str = "digits",
    device: str = "cpu",
    model: str | None = None,
    arch: str | None = None,
    size: int = 32,
) -> list[str]:
    # Synthetic data: the digits config's loader is unused, its geometry must match what synthetic_data says it stored.
    synthetic = ["data.channels=3", f"data.image_size={size}"] if data == SYNTHETIC else []
    timm = [f"model.arch={arch or DEFAULT_ARCH}", "model.pretrained=false", "model.freeze_epochs=0"]
    return [
        f"data={'digits' if data == SYNTHETIC else data}",
        *synthetic,
        "augment=default" if data == "digits" else "augment=none",
        f"model={model or ('resnet_small' if data == SYNTHETIC else 'cnn')}",
        "optim=adamw",
        "optim.scheduler=onecycle",
        "data.batch_size=64",
        f"train.epochs={epochs}",
        "train.hparams=params",
        "train.early_stopping_patience=0",
        f"trainer.accelerator={'cpu' if device == 'cpu' else 'cuda'}",
        f"trainer.precision={'32-true' if device == 'cpu' else 'bf16-mixed'}",
        "trainer.devices=1",
        f"trainer.threads={threads}",
        f"trainer.channels_last={'off' if device == 'cpu' else 'on'}",
        *(timm if model == "timm" else []),
    ]


def synthetic_data(n: int, seed: int = 0, size: int = 32) -> tuple[dict[str, Any], Any, Any]:
    """CIFAR-10-like random data: n train and n // 10 val uint8 3 x size x size images, 10 classes, stored at the
    network's input size (meta["preprocess"]: no crop, as prepare records it)."""
    import numpy as np

    from cnnpipe.data.store import Split

    rng = np.random.default_rng(seed)

    def split(count: int) -> Split:
        images = rng.integers(0, 256, size=(count, 3, size, size), dtype=np.uint8)
        return Split(images, rng.integers(0, 10, size=count).astype(np.int64))

    meta = {
        "image_shape": [3, size, size],
        "classes": [str(i) for i in range(10)],
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "preprocess": {"input_size": size, "storage_size": size, "interpolation": "bilinear", "crop_pct": 1.0},
    }
    return meta, split(n), split(max(n // 10, 1))


def train_flops_per_image(cfg: Any, meta: dict[str, Any], batch: int = 8) -> float:
    """Forward + backward FLOPs of one training image (torch's FlopCounterMode: convolutions and matmuls)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from cnnpipe.models.factory import build_model, model_spec

    net = build_model(model_spec(cfg.model, meta))
    x = torch.rand(batch, *meta["image_shape"])
    y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return counter.get_total_flops() / batch


def bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in device_name), None)


def train_ours(
    cfg: Any, meta: dict[str, Any], train: Any, val: Any, out: dict[str, Any], callbacks: list | None = None
) -> float:
    """The real train path: `cnnpipe.training.fit.fit` builds the ImageClassifier, InMemoryDataModule,
    EpochHistory and the Trainer from build_trainer; no checkpoint folder (nothing written), no MLflow sink."""
    from cnnpipe.training.fit import fit

    with stopwatch() as t:
        res = fit(cfg, meta, train, val, ckpt_dir=None, sinks=None, quiet=True, callbacks=callbacks)
    out["val_acc"], out["train_loss"] = res.history[-1]["val/acc"], res.history[-1]["train/loss"]
    out["epoch_s"] = [row["epoch_time_s"] for row in res.history]  # training + validation of each epoch
    return t["s"]


def raw_groups(net: Any, cfg: Any) -> list[dict[str, Any]]:
    """The optimiser settings of cnnpipe's recipe (training/optimizers.py), written out: weight decay on weight
    matrices and kernels, none on 1-D tensors (norm weights, biases) unless optim.decay_norm_bias. One lr for
    all: B1 runs with optim.backbone_lr=1 (the head's and the backbone's groups then get the same updates)."""
    if cfg.optim.backbone_lr != 1.0:
        raise ValueError("B1's raw loop assumes optim.backbone_lr=1")
    decay = [p for p in net.parameters() if cfg.optim.decay_norm_bias or p.ndim > 1]
    other = [p for p in net.parameters() if not (cfg.optim.decay_norm_bias or p.ndim > 1)]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}]
    return groups + ([{"params": other, "weight_decay": 0.0}] if other else [])


def train_raw(cfg: Any, meta: dict[str, Any], train: Any, val: Any, out: dict[str, Any]) -> float:
    """A hand-written loop doing the same work: forward, loss, backward, step, scheduler step, running
    loss/accuracy on the device (read once per epoch), then validation loss/accuracy. On CUDA: data on the
    device, bf16 autocast around forward + loss (what Lightning's bf16-mixed does)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from cnnpipe.models.factory import build_model, model_spec

    device = torch.device("cpu" if cfg.trainer.accelerator == "cpu" else "cuda")
    bf16 = cfg.trainer.precision == "bf16-mixed"

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    with stopwatch() as t:
        torch.manual_seed(cfg.seed)  # what fit's pl.seed_everything does for torch: the same initial weights
        net = build_model(model_spec(cfg.model, meta)).to(device)
        memory_format = torch.channels_last if cfg.trainer.channels_last == "on" else torch.contiguous_format
        net = net.to(memory_format=memory_format)
        images = torch.from_numpy(train.images).to(device).contiguous(memory_format=memory_format)
        val_images = torch.from_numpy(val.images).to(device).contiguous(memory_format=memory_format)
        labels, val_labels = torch.from_numpy(train.labels).to(device), torch.from_numpy(val.labels).to(device)
        bs, n, epochs = cfg.data.batch_size, len(labels), cfg.train.epochs
        opt = torch.optim.AdamW(raw_groups(net, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optim.lr, total_steps=epochs * math.ceil(n / bs))
        out["epoch_s"] = []
        for epoch in range(epochs):
            epoch_start = time.monotonic()
            net.train()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).to(device)
            loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                x, y = images[idx].float().div_(255.0), labels[idx]
                with autocast():
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
            out["train_loss"] = float(loss_sum) / n
            net.eval()
            with torch.inference_mode():
                val_loss = torch.zeros((), device=device)
                val_correct = torch.zeros((), dtype=torch.long, device=device)
                for start in range(0, len(val_labels), bs):
                    x, y = val_images[start : start + bs].float().div_(255.0), val_labels[start : start + bs]
                    with autocast():
                        logits = net(x)
                    val_loss += F.cross_entropy(logits.float(), y) * len(y)
                    val_correct += (logits.argmax(1) == y).sum()
                out["val_acc"] = float(val_correct) / len(val_labels)
                out["val_loss"] = float(val_loss) / len(val_labels)
            out["epoch_s"].append(time.monotonic() - epoch_start)
        net.cpu()  # as fit returns the net on the CPU
    return t["s"]


def run(
    repeats: int | None = None,
    quick: bool = False,
    threads: int = 1,
    epochs: int | None = None,
    data: str = "digits",
    device: str = "cpu",
    model: str | None = None,
    n_synthetic: int | None = None,
    arch: str | None = None,
    size: int | None = None,
) -> dict:
    timm = model == "timm"
    if timm and data != SYNTHETIC:
        raise SystemExit(f"--model timm runs on --data {SYNTHETIC} (RGB images of --size px)")
    size = size or (64 if timm else 32)
    arch = arch or DEFAULT_ARCH
    if timm and device == "cpu":  # ~1 GFLOP per training image at 64 px: fewer images, epochs and repeats
        repeats = repeats or (2 if quick else 9)
        epochs = epochs or (1 if quick else 2)
        n_synthetic = n_synthetic or (128 if quick else 512)
    if timm and device == "cuda":  # resnet50 / ViT-B at 224 px: ~1 min a fit on an H100 with these
        repeats = repeats or (2 if quick else 5)
        epochs = epochs or (1 if quick else 2)
        n_synthetic = n_synthetic or (2_000 if quick else 20_000)
    repeats = repeats or (5 if quick else 25)
    epochs = epochs or (2 if quick else 4)
    if timm:
        name = "-".join([NAME, "timm", arch, f"{size}px", *([device] if device != "cpu" else [])])
    else:
        name = "-".join(
            [
                NAME,
                *([data] if data != "digits" else []),
                *([model] if model else []),
                *([f"{size}px"] if size != 32 else []),
                *([device] if device != "cpu" else []),
            ]
        )
    pin_threads(threads)
    quiet()
    cfg = bench_config(overrides(threads, epochs, data, device, model, arch, size))
    if data == SYNTHETIC:
        meta, train, val = synthetic_data(n_synthetic or (50_000 if device == "cuda" else 4_096), cfg.seed, size)
    else:
        with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-b1-") as tmp:
            meta, train, val = prepare_data(Path(tmp), cfg)
    n = len(train.labels)
    flops = train_flops_per_image(cfg, meta)
    last: dict[str, dict[str, Any]] = {"ours": {}, "raw": {}}
    steady: dict[str, list[float]] = {"ours": [], "raw": []}  # per repeat: median epoch time after the first

    def timed(side: str, fn: Any) -> float:
        seconds = fn(cfg, meta, train, val, last[side])
        steady[side].append(median(last[side]["epoch_s"][1:] or last[side]["epoch_s"]))
        return seconds

    samples = interleaved(
        {"ours": lambda: timed("ours", train_ours), "raw": lambda: timed("raw", train_raw)},
        repeats,
        warmup=1,
        label=name,
    )
    steady = {side: values[-repeats:] for side, values in steady.items()}  # drop the warm-up
    photo = augment_cost(cfg, meta, threads, repeats=3 if quick else 15) if timm else None
    steady_ratio = median(paired_ratios(steady["raw"], steady["ours"]))
    images = epochs * n
    ours_ips = [images / s for s in samples["ours"]]
    raw_ips = [images / s for s in samples["raw"]]
    ratio = median(paired_ratios(ours_ips, raw_ips))
    peak = bf16_peak(_gpu_name()) if device == "cuda" else None
    ours_flops = flops * median(ours_ips)
    details = {
        "train_flops_per_image": flops,
        "ours_achieved_flops_per_s": ours_flops,
        "raw_achieved_flops_per_s": flops * median(raw_ips),
        "bf16_peak_flops_per_s": peak,
        "ours_mfu": ours_flops / peak if peak else None,
        "mfu_note": "model FLOPs utilisation: train FLOPs per image (forward + backward, FlopCounterMode) x images/s "
        "(whole fit, validation included in the time) / the GPU's dense bf16 peak",
        "unit": "images/s",
        "ours_images_per_s": spread(ours_ips),
        "raw_images_per_s": spread(raw_ips),
        "ours_fit_s": samples["ours"],
        "raw_fit_s": samples["raw"],
        "ratio_per_repeat": paired_ratios(ours_ips, raw_ips),
        "steady_state_ratio": steady_ratio,
        "steady_state_note": "raw/ours median epoch time (training + validation) over epochs 2..E: the train "
        "step without the once-per-fit costs (Trainer construction, set-up, first epoch)",
        "ours_epoch_s": spread(steady["ours"]),
        "raw_epoch_s": spread(steady["raw"]),
        "repeats": repeats,
        "warmup": 1,
        "epochs_per_repeat": epochs,
        "train_images": n,
        "val_images": len(val.labels),
        "batch_size": cfg.data.batch_size,
        "steps_per_epoch": math.ceil(n / cfg.data.batch_size),
        "model": cfg.model.name + (f" {cfg.model.arch} (pretrained=false, freeze_epochs=0)" if timm else ""),
        "channels_last": cfg.trainer.channels_last,
        "optimizer": f"{cfg.optim.name} lr={cfg.optim.lr} + {cfg.optim.scheduler}",
        "seed": cfg.seed,
        "sanity_last_repeat": last,
    }
    if photo is not None:
        details["augment_photo"] = photo
    net_name = f"timm {cfg.model.arch}" if timm else cfg.model.name
    record = result(
        name=name,
        title="train step throughput",
        what=f"train images/s, {net_name} on {'augmented ' if data == 'digits' else ''}{data} "
        f"({n} img, {'x'.join(map(str, train.images.shape[1:]))}), bs {cfg.data.batch_size}, "
        f"{epochs} epochs per run incl. validation"
        + (f", {device} {cfg.trainer.precision} ({_gpu_name()})" if device != "cpu" else ""),
        ours=f"{median(ours_ips):,.0f} img/s (Lightning Trainer; per epoch after the first: {steady_ratio:.3f} of raw"
        + (f"; MFU {ours_flops / peak:.1%} of bf16 peak" if peak else f"; {ours_flops / 1e9:,.1f} GFLOP/s")
        + (f"; augment=photo alone {photo['augment_images_per_s']:,.0f} img/s" if photo else "")
        + ")",
        baseline=f"{median(raw_ips):,.0f} img/s (raw loop)",
        ratio=ratio,
        ratio_label="ours/raw",
        goal_op=">=",
        goal=0.97,
        threads=threads,
        quick=quick,
        details=details,
    )
    write_result(record)
    return record


def augment_cost(cfg: Any, meta: dict[str, Any], threads: int, repeats: int = 15, calls: int = 3) -> dict[str, Any]:
    """augment=photo's per-image batch augmentation (data/online_augment.py: random-resized crop, flip, per-image
    RandAugment) on one batch, against one train step (forward, loss, backward, AdamW step) of the same net on the
    same batch, interleaved; each sample is `calls` calls. The stored size is the input size here (no crop margin)."""
    import torch
    import torch.nn.functional as F

    from cnnpipe.data.online_augment import online_augment
    from cnnpipe.models.factory import build_model, model_spec

    chosen = overrides(
        threads, cfg.train.epochs, SYNTHETIC, cfg.trainer.accelerator, "timm", cfg.model.arch, cfg.data.image_size
    )
    photo = bench_config([o for o in chosen if not o.startswith("augment=")] + ["augment=photo"])
    device = torch.device("cpu" if cfg.trainer.accelerator == "cpu" else "cuda")
    size, bs = int(meta["image_shape"][-1]), cfg.data.batch_size
    augment = online_augment(photo.augment.online, size, seed=cfg.seed)
    assert augment is not None
    augment = augment.to(device)
    torch.manual_seed(cfg.seed)
    net = build_model(model_spec(cfg.model, meta)).to(device).train()
    opt = torch.optim.AdamW(raw_groups(net, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, 256, (bs, 3, size, size), generator=gen, dtype=torch.uint8).to(device).float().div_(255.0)
    y = torch.randint(0, 10, (bs,), generator=gen).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def augment_only() -> float:
        with stopwatch() as t:
            for _ in range(calls):
                augment(x)
            sync()
        return t["s"] / calls

    def step() -> float:
        with stopwatch() as t:
            for _ in range(calls):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sync()
        return t["s"] / calls

    samples = interleaved({"augment": augment_only, "step": step}, repeats, warmup=1)
    share = paired_ratios(samples["augment"], [a + s for a, s in zip(samples["augment"], samples["step"], strict=True)])
    return {
        "what": f"OnlineAugment of augment=photo ({photo.augment.online.policy}, crop_scale "
        f"{photo.augment.online.crop_scale}, hflip) on a batch of {bs} 3x{size}x{size} vs one train step",
        "augment_images_per_s": bs / median(samples["augment"]),
        "step_images_per_s": bs / median(samples["step"]),
        "augment_ms_per_batch": spread([s * 1e3 for s in samples["augment"]]),
        "step_ms_per_batch": spread([s * 1e3 for s in samples["step"]]),
        "augment_share_of_step": median(share),
        "share_note": "augment / (augment + train step), median of interleaved pairs: the fraction of a training "
        "iteration that augment=photo would add",
        "repeats": repeats,
        "calls_per_sample": calls,
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def _options(parser: Any) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="epochs per timed run")
    parser.add_argument("--data", default="digits", help="data config (digits; mnist5k: 28x28, augment=none)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16-mixed on both sides")
    parser.add_argument("--model", default=None, help="model config (default cnn; resnet_small for cifar-synthetic)")
    parser.add_argument("--n", type=int, default=None, help="cifar-synthetic training images")
    parser.add_argument("--arch", default=None, help=f"timm architecture with --model timm (default {DEFAULT_ARCH})")
    parser.add_argument("--size", type=int, default=None, help="cifar-synthetic image side (default 32; timm 64)")


def main(argv: list[str] | None = None) -> None:
    args = cli(__doc__, argv, _options)
    run(
        args.repeats,
        args.quick,
        args.threads,
        args.epochs,
        args.data,
        args.device,
        args.model,
        args.n,
        args.arch,
        args.size,
    )


if __name__ == "__main__":
    main()
