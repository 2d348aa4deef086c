"""The train stage: fit on augmented train + val, save the model, log everything to one MLflow run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cnnpipe.atomic import write_json_atomic, write_text_atomic
from cnnpipe.config import Config, as_dict, flatten, with_values
from cnnpipe.console import info, warn
from cnnpipe.data.preprocess import Geometry, check_prepared, resolve_normalisation
from cnnpipe.data.store import Split, load_meta, load_split
from cnnpipe.errors import DataError
from cnnpipe.models.predictor import ImagePredictor
from cnnpipe.models.store import RUN_FILE, SPEC, SPEC_SHA, WEIGHTS, WEIGHTS_SHA, file_sha256, publish_model, save_model
from cnnpipe.monitoring.reference import REFERENCE, build_reference, draw, save_reference
from cnnpipe.redact import mask_secrets
from cnnpipe.tracking.datasets import combined_digest, split_inputs
from cnnpipe.tracking.model_logging import log_image_model
from cnnpipe.tracking.names import experiment_name, run_label
from cnnpipe.tracking.runs import close_run, connect, tracked_run
from cnnpipe.tracking.tags import run_tags
from cnnpipe.training.curves import history_csv, plot_curves
from cnnpipe.training.distributed import launch_rank
from cnnpipe.training.fit import balanced_loss_weights, check_pretrained_weights, fit, log_class_balance
from cnnpipe.training.resume import (
    Damaged,
    HistoryFile,
    discard_stale_checkpoints,
    find_resumable,
    finish_checkpoints,
    outputs_dir,
    start_checkpoints,
    weights_dir,
)
from cnnpipe.training.trainer import resolve_strategy

# What the train stage publishes to models/, as one unit (run.json last, naming the run and the weights' sha256).
OUTPUTS = [WEIGHTS, SPEC, REFERENCE, "history.csv", "curves.png", "config.yaml", RUN_FILE]


def apply_hparams(cfg: Config, root: Path, explicit: frozenset[str] = frozenset()) -> tuple[Config, dict[str, str]]:
    """`train.hparams=sweep`: the sweep's best values over params.yaml, and tags linking the run to the
    sweep's parent run and best trial; a key the user set (`explicit`: on the command line, or in params.yaml
    apart from conf/) keeps the user's value, and the run says so. `train.hparams=params`: params.yaml as is."""
    if cfg.train.hparams != "sweep":
        return cfg, {"cnnpipe.hparams": "params"}
    path = root / cfg.paths.sweep / "best_params.yaml"
    try:
        best = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run `dvc repro sweep` first, or set train.hparams=params") from None
    if not isinstance(best, dict) or not isinstance(best.get("params"), dict):
        raise DataError(f"{path}: not a cnnpipe sweep result (no `params` mapping)")
    swept = {k: v for k, v in best["params"].items() if k not in explicit}
    kept = {k: v for k, v in best["params"].items() if k in explicit}
    tuned = with_values(cfg, swept, source=str(path), root=root)
    tags = {
        "cnnpipe.hparams": "sweep",
        "cnnpipe.sweep_study": str(best.get("study")),
        "cnnpipe.sweep_run_id": str(best.get("mlflow_parent_run_id")),
        "cnnpipe.sweep_best_trial": str(best.get("best_trial")),
        "cnnpipe.sweep_best_trial_run_id": str(best.get("mlflow_trial_run_id")),
    }
    shown = ", ".join(f"{k}={_short(v)}" for k, v in swept.items()) or "none"
    info("train", f"hyperparameters from the sweep (trial {best.get('best_trial')}): {shown}")
    if kept:
        tags["cnnpipe.hparams_set_by_user"] = ", ".join(sorted(kept))
        given = flatten(as_dict(cfg))
        mine = ", ".join(f"{k}={_short(given[k])} (sweep's best {_short(v)})" for k, v in kept.items())
        info("train", f"set by you, so used instead of the sweep's: {mine}")
    return tuned, tags


def resolved_tags(cfg: Config, meta: dict[str, Any], geometry: Geometry, origin: str | None) -> dict[str, str]:
    """What the config's nulls resolved to (the model's own preprocessing), where pretrained weights came from, and
    the DDP strategy when it is not the config's: the run says the values it used, not only `null`."""
    mean, std = resolve_normalisation(cfg.model, int(meta["image_shape"][0]), meta)
    tags = {
        "cnnpipe.input_size": str(geometry.input_size),
        "cnnpipe.stored_size": str(geometry.storage_size),
        "cnnpipe.interpolation": geometry.interpolation,
        "cnnpipe.normalise": f"mean {[round(v, 4) for v in mean]}, std {[round(v, 4) for v in std]}",
    }
    if origin is not None:
        tags["cnnpipe.pretrained_weights"] = origin
    strategy = resolve_strategy(cfg)
    if strategy != cfg.trainer.strategy:
        tags["cnnpipe.strategy"] = strategy
        info(
            "train",
            f"trainer.strategy={cfg.trainer.strategy} runs as {strategy}: the frozen backbone (model."
            "freeze_epochs) has no gradients, which DDP must expect",
        )
    return tags


def _short(value: Any) -> str:
    """A value as printed: floats to 4 significant digits (not 1.0000001192092896)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_training(cfg: Config, root: Path, explicit: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The train stage. `explicit`: the keys the user set (config.explicit_keys), which the sweep's values
    do not replace."""
    cfg, hparam_tags = apply_hparams(cfg, root, explicit)
    prepared, augmented = root / cfg.paths.prepared, root / cfg.paths.augmented
    meta = load_meta(prepared)
    geometry = check_prepared(cfg, meta, str(prepared / "meta.json"))
    train_file, val_file = augmented / "train.npz", prepared / "val.npz"
    train, val = load_split(train_file, mmap=True, meta=meta), load_split(val_file, mmap=True, meta=meta)
    out = root / cfg.paths.models
    inputs = split_inputs(cfg.data.name, {"train": (train_file, train), "val": (val_file, val)})
    ckpt_root = root / cfg.paths.checkpoints
    rank = launch_rank(cfg.trainer.devices)
    damaged: list[Damaged] = []
    if rank == 0:
        discard_stale_checkpoints(ckpt_root)  # folders of runs killed before their first checkpoint
    resumable = find_resumable(cfg, ckpt_root, claim=rank == 0, damaged=damaged)
    if damaged:
        _close_damaged_runs(cfg, root, damaged, resumable.run_id if resumable else None)
    # Pretrained weights found and tried on the network now, before an MLflow run or a checkpoint folder exists:
    # missing or unfitting weights are one line and nothing else. A resumed run's checkpoint holds its weights.
    origin = None if resumable else check_pretrained_weights(cfg, meta)
    balanced_loss_weights(cfg, train, list(meta["classes"]))  # a class train.class_balance cannot balance: one line
    info(
        "train",
        f"{len(train.labels)} train / {len(val.labels)} val images, model {cfg.model.name}"
        f"{f' {cfg.model.arch}' if cfg.model.arch else ''}, {cfg.train.epochs} epochs",
    )
    tags = {
        **run_tags(root, "train", cfg.data.name, combined_digest(inputs)),
        **hparam_tags,
        **resolved_tags(cfg, meta, geometry, origin),
    }
    if rank != 0:
        # DDP worker: same training, no MLflow run, no outputs (rank 0's checkpoint folder is broadcast).
        fit(
            cfg,
            meta,
            train,
            val,
            weights_dir(resumable.folder if resumable else ckpt_root / "pending"),
            quiet=True,
            resume_from=resumable.last_checkpoint if resumable else None,
            expect_rank=rank,
            root=root,
        )
        return {}
    with tracked_run(
        cfg.tracking.uri,
        root,
        experiment_name(cfg),
        f"train-{run_label()}",
        tags,
        reopen_run_id=resumable.run_id if resumable else None,
    ) as run:
        if resumable:
            info(
                "train",
                f"resuming MLflow run {run.run_id} after epoch {len(resumable.history)} "
                f"from {resumable.last_checkpoint}",
            )
        else:
            info("train", f"MLflow run {run.run_id} in {mask_secrets(run.uri)}")
        # The same param keys as the sweep's trials (the config, nothing else): MLflow's compare view offers the
        # params whose values differ, and a key only one run has would count as one. Split sizes are in the inputs.
        run.log_params(flatten(as_dict(cfg)), only_new=bool(resumable))
        balanced = log_class_balance(run, cfg, train, list(meta["classes"]))  # the param says which; this, with what
        if balanced is not None:
            info("train", f"train.class_balance=loss, class weights {balanced}")
        elif cfg.train.class_balance == "sampler":
            info(
                "train",
                f"train.class_balance=sampler: each epoch's {len(train.labels)} images are drawn with replacement, "
                "every class equally likely",
            )
        if not resumable:
            run.log_inputs(inputs, root)
        started = time.time()
        folder = start_checkpoints(cfg, ckpt_root, run.run_id)
        history = HistoryFile(folder, resumable.history if resumable else [])
        result = fit(
            cfg,
            meta,
            train,
            val,
            weights_dir(folder),
            sinks=[run.log_metrics, history],
            resume_from=resumable.last_checkpoint if resumable else None,
            expect_rank=0,
            root=root,
        )
        run.set_tags({"cnnpipe.torch_threads": str(torch.get_num_threads())})  # trainer.threads=0 means auto

        # Everything goes to this run's own folder first: MLflow gets exactly these files, and models/ gets them
        # as one unit (a second training at the same time can never pair its run id with our weights).
        staged = outputs_dir(folder)
        save_model(staged, result.net, result.spec)
        write_text_atomic(staged / "history.csv", history_csv(history.rows))
        plot_curves(history.rows, staged / "curves.png")
        write_text_atomic(staged / "config.yaml", mask_secrets(yaml.safe_dump(as_dict(cfg), sort_keys=False)))
        weights_sha = file_sha256(staged / WEIGHTS)
        run.set_tags({"cnnpipe.weights_sha256": weights_sha})
        write_reference(staged, val, meta, run.run_id, weights_sha, next(result.net.parameters()).device)
        for name in ("curves.png", "history.csv", "config.yaml", "model.json"):
            run.log_artifact(staged / name)
        if result.best_score is not None:
            # A summary, at step 0 like the test metrics: MLflow charts step-0 metrics as bars across runs (at the
            # best epoch's step it drew one dot per run on an epoch axis). The epoch is a tag.
            run.log_metrics({f"best/{cfg.train.monitor}": result.best_score}, step=0)
            run.set_tags({"cnnpipe.best_epoch": str(result.best_epoch)})
        if cfg.tracking.log_model:
            log_image_model(staged, train.images[:2])  # pyfunc over the saved safetensors + spec; raw uint8 in
        summary = {
            "run_id": run.run_id,
            "experiment": experiment_name(cfg),
            "tracking_uri": mask_secrets(run.uri),
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "monitor": cfg.train.monitor,
            WEIGHTS_SHA: weights_sha,
            SPEC_SHA: file_sha256(staged / SPEC),
        }
        write_json_atomic(staged / RUN_FILE, summary)
        previous, published_at = publish_model(staged, out, OUTPUTS)
        _say_published(out, run.run_id, previous, published_at, started)
        finish_checkpoints(folder)
    info("train", f"best {cfg.train.monitor} {_short(result.best_score)} at epoch {result.best_epoch}")
    return summary


def write_reference(
    folder: Path, val: Split, meta: dict[str, Any], run_id: str, weights_sha: str, device: torch.device
) -> None:
    """The monitor's training reference (`monitoring.reference`) beside the saved model in `folder`: the saved
    model itself (as served, from the safetensors; on the training `device`) on the validation split, at most
    MAX_IMAGES of it."""
    predictor = ImagePredictor.from_folder(folder, device)
    images = np.ascontiguousarray(val.images[draw(len(val.labels))])
    layer = predictor.classifier_layer()
    if layer is None:
        probs, embeddings = predictor.probabilities(images), None
    else:
        probs, embeddings = predictor.embedded(images, layer)
    info = {"model_run": run_id, "weights_sha256": weights_sha, "layer": layer, "classes": predictor.classes}
    info["source"] = "validation split"
    save_reference(folder / REFERENCE, build_reference(images, probs, embeddings, meta, info))


def _say_published(
    out: Path, run_id: str, previous: dict[str, Any] | None, published_at: float | None, started: float
) -> None:
    """Two trainings that finish at about the same time: the last one to publish holds models/ (each one's
    MLflow run is complete and holds its own model either way); say so when it happened."""
    other = previous.get("run_id") if previous else None
    if other and other != run_id and published_at is not None and published_at >= started:
        warn(
            "train",
            f"run {other}, trained at the same time, was published to {out} while this run trained; "
            f"{out} now holds this run {run_id} (the last to finish wins; both runs are complete in MLflow)",
        )
    else:
        info("train", f"{out}: the model of run {run_id}")


def _close_damaged_runs(cfg: Config, root: Path, damaged: list[Damaged], resumed: str | None) -> None:
    """The MLflow run of a damaged checkpoint that is not resumed, if still RUNNING (its process died writing it)."""
    client, _ = connect(cfg.tracking.uri, root)
    for d in damaged:
        if d.run_id != resumed:
            close_run(client, d.run_id, f"its checkpoint {d.checkpoint} is damaged (set aside as {d.set_aside.name})")
