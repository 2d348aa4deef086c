"""Fit a model on in-memory splits and return the best weights (shared by train and, later, sweep)."""

from __future__ import annotations

import json
import signal
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from cnnpipe.atomic import write_json_atomic
from cnnpipe.config import Config
from cnnpipe.data.datamodule import InMemoryDataModule
from cnnpipe.data.online_augment import online_augment
from cnnpipe.data.preprocess import check_prepared
from cnnpipe.data.store import Split
from cnnpipe.errors import DataError
from cnnpipe.models.factory import build_model, model_spec
from cnnpipe.models.timm_net import weights_origin
from cnnpipe.training.callbacks import EpochHistory, MetricSink
from cnnpipe.training.finetune import FreezeBackbone
from cnnpipe.training.init_from import initialise_from
from cnnpipe.training.module import ImageClassifier
from cnnpipe.training.trainer import build_trainer, checkpoint_callbacks, use_channels_last

if TYPE_CHECKING:
    from cnnpipe.tracking.runs import RunLogger

CLASS_WEIGHTS_TAG = "cnnpipe.class_weights"
CLASS_WEIGHTS_FILE = "class_weights.json"
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)


@dataclass
class FitResult:
    net: nn.Module
    spec: dict[str, Any]
    history: list[dict[str, float]]
    best_score: float | None
    best_epoch: int | None
    trainer: pl.Trainer = field(repr=False)


def fit(
    cfg: Config,
    meta: dict[str, Any],
    train: Split,
    val: Split,
    ckpt_dir: Path | None,
    sinks: list[MetricSink] | None = None,
    callbacks: list[Callback] | None = None,
    quiet: bool = False,
    resume_from: Path | None = None,
    expect_rank: int | None = None,
    root: Path | None = None,
) -> FitResult:
    """Seed once, train for `train.epochs`, then load the checkpoint that was best on `train.monitor`.
    With `ckpt_dir=None` (sweep trials) nothing is written and the final weights are returned.
    `resume_from`: a last.ckpt in `ckpt_dir` to continue from (model, optimiser, scheduler, epoch, best).
    Ctrl-C / SIGTERM surface as KeyboardInterrupt (Lightning turns them into `sys.exit(1)`)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    geometry = check_prepared(cfg, meta, "meta.json")
    spec = model_spec(cfg.model, meta)
    # A resumed run's checkpoint already holds the weights: no pretrained download, no init_from.
    net = build_model(spec, pretrained=resume_from is None)
    if cfg.model.init_from and resume_from is None:
        initialise_from(net, cfg, root or Path.cwd())
    callbacks = [*(callbacks or []), *([FreezeBackbone(cfg.model.freeze_epochs)] if cfg.model.freeze_epochs else [])]
    module = ImageClassifier(
        net,
        len(spec["classes"]),
        cfg.optim,
        cfg.train.label_smoothing,
        scale_lr=cfg.trainer.scale_lr,
        batch_size=cfg.data.batch_size,
        grad_clip=cfg.train.grad_clip,
        augment=online_augment(cfg.augment.online, geometry.input_size, seed=cfg.seed),
        mixup=mixup(cfg, len(spec["classes"])),
        accumulate=cfg.train.accumulate,
        ema=cfg.train.ema,
        seed=cfg.seed,
        class_weights=balanced_loss_weights(cfg, train, spec["classes"]),
    )
    if use_channels_last(cfg):
        module = module.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        module.net = torch.compile(module.net)  # type: ignore[assignment]
    data = datamodule(cfg, train, val)
    history = EpochHistory(sinks, quiet=quiet)
    ckpt = None
    savers: list[Callback] = []
    if ckpt_dir is not None:
        if resume_from is None:
            for stale in ckpt_dir.glob("*.ckpt"):
                stale.unlink()
        ckpt, last = checkpoint_callbacks(cfg, ckpt_dir)
        savers = [ckpt, last]
    trainer = build_trainer(cfg, [history, *savers, *(callbacks or [])], root_dir=ckpt_dir)
    if expect_rank is not None and trainer.global_rank != expect_rank:
        raise RuntimeError(f"launch environment says rank {expect_rank}, Lightning says {trainer.global_rank}")
    try:
        with warnings.catch_warnings():
            if resume_from is not None:  # the folder holds the checkpoints we resume from, as it should
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            if module.ema is not None:  # timm's weight average is in eval mode on purpose (it is never trained)
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
    except SystemExit:
        if trainer.interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning set it to SIG_IGN
            raise KeyboardInterrupt("training interrupted") from None
        raise
    best_score = best_epoch = None
    if ckpt is not None and ckpt.best_model_path and trainer.is_global_zero:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state["state_dict"])
        best_score = float(ckpt.best_model_score) if ckpt.best_model_score is not None else None
        best_epoch = int(state.get("epoch", -1)) + 1  # Lightning counts from 0, the history from 1
    evaluated = module.evaluated_net()  # the weight average when train.ema is on
    net = getattr(evaluated, "_orig_mod", evaluated)  # the plain module behind torch.compile
    return FitResult(net.cpu().eval(), spec, history.rows, best_score, best_epoch, trainer)


def check_pretrained_weights(cfg: Config, meta: dict[str, Any]) -> str | None:
    """Where the pretrained weights come from (None without them), after building the network with them once: a
    missing, unreadable or unfitting weights file is one ConfigError here, before a stage opens a run or writes."""
    origin = weights_origin(cfg.model)
    if origin is not None:
        build_model(model_spec(cfg.model, meta), pretrained=True)
    return origin


def mixup(cfg: Config, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """timm's Mixup for augment.online.mixup / cutmix (either > 0; both: one or the other per batch), with
    train.label_smoothing folded into its soft targets; None when both are 0."""
    online = cfg.augment.online
    if not (online.mixup or online.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=online.mixup,
        cutmix_alpha=online.cutmix,
        label_smoothing=cfg.train.label_smoothing,
        num_classes=num_classes,
    )


def datamodule(cfg: Config, train: Split, val: Split, steps_per_call: int | None = None) -> InMemoryDataModule:
    """The training and validation batches `fit` trains on (`steps_per_call`: default `trainer.steps_per_call`)."""
    return InMemoryDataModule(
        train,
        val,
        cfg.data.batch_size,
        cfg.seed,
        channels_last=use_channels_last(cfg),
        on_device=cfg.data.on_device,
        steps_per_call=cfg.trainer.steps_per_call if steps_per_call is None else steps_per_call,
        workers=cfg.data.workers,
        balance_classes=cfg.train.class_balance == "sampler",
    )


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" class weights, n_samples / (n_classes * count_c): every class's samples weigh the
    same in total. Written out because importing sklearn.utils.class_weight takes 1.8 s; the tests check it
    against `compute_class_weight`."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return torch.from_numpy(len(labels) / (num_classes * counts)).float()


def balanced_loss_weights(cfg: Config, train: Split, classes: list[str]) -> torch.Tensor | None:
    """The class weights of the training loss (train.class_balance=loss), else None. With any balancing, a class
    without training images is one DataError: it could neither be weighted nor drawn."""
    if cfg.train.class_balance == "none":
        return None
    counts = np.bincount(np.asarray(train.labels, dtype=np.int64), minlength=len(classes))
    missing = [name for name, count in zip(classes, counts, strict=False) if count == 0]
    if missing:
        where = train.source or "the train split"
        raise DataError(
            f"{where}: no images of class {', '.join(missing)}; train.class_balance={cfg.train.class_balance} "
            "needs every class in the train split"
        )
    return class_weights(train.labels, len(classes)) if cfg.train.class_balance == "loss" else None


def log_class_balance(run: RunLogger, cfg: Config, train: Split, classes: list[str]) -> str | None:
    """What train.class_balance trains with, on the run (the setting itself is the param train.class_balance):
    for `loss` the class weights, as tag `cnnpipe.class_weights` (JSON {class: weight}, 6 significant digits:
    class names are data, a `name:weight` list could not be read back). Past MLflow's 8000 characters for a tag
    (hundreds of classes) they go to the artifact class_weights.json (full precision), which the tag names.
    Returns the tag's text (None: nothing to log)."""
    weights = balanced_loss_weights(cfg, train, classes)
    if weights is None:
        return None
    pairs = json.dumps({name: float(f"{w:.6g}") for name, w in zip(classes, weights.tolist(), strict=True)})
    if len(pairs) > MAX_TAG_CHARS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CLASS_WEIGHTS_FILE
            write_json_atomic(path, dict(zip(classes, weights.tolist(), strict=True)))
            run.log_artifact(path)
        low, high = (f"{classes[i]}:{float(weights[i]):.6g}" for i in (int(weights.argmin()), int(weights.argmax())))
        pairs = f"{len(classes)} classes, from {low} to {high}; all in the artifact {CLASS_WEIGHTS_FILE}"
    run.set_tags({CLASS_WEIGHTS_TAG: pairs})
    return pairs
