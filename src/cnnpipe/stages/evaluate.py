"""The evaluate stage: the trained model on the test split -> eval/ files + test/* in the train run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cnnpipe.atomic import write_json_atomic, write_text_atomic
from cnnpipe.config import Config
from cnnpipe.console import info
from cnnpipe.data.store import load_split
from cnnpipe.errors import DataError
from cnnpipe.evaluation.metrics import (
    classification_metrics,
    confusion_records,
    per_class_csv,
    per_class_metric_names,
    predict_logits,
)
from cnnpipe.evaluation.plots import plot_confusion
from cnnpipe.evaluation.report import render_html, render_markdown, report_content, summary_table
from cnnpipe.models.store import load_published
from cnnpipe.tracking.datasets import split_inputs
from cnnpipe.tracking.registry import register_run_model, registered_model_name
from cnnpipe.tracking.runs import log_into_run


def register(cfg: Config, root: Path, run_id: str, metrics: dict[str, float]) -> None:
    """The train run's model -> a registered version (alias `candidate`), `champion` if it beats the current one."""
    name = registered_model_name(cfg.tracking.registered_model, cfg.data.name)
    reg = register_run_model(
        cfg.tracking.uri, root, run_id, name, metrics, cfg.tracking.champion_metric, cfg.tracking.champion_mode
    )
    if reg is None:
        info("evaluate", f"run {run_id} logged no model (tracking.log_model=false): nothing registered")
        return
    role = "candidate and champion" if reg.champion else "candidate"
    info("evaluate", f"registered {reg.name} version {reg.version} as {role}: {reg.reason}")


def run_evaluation(cfg: Config, root: Path) -> dict[str, Any]:
    models_dir, out = root / cfg.paths.models, root / cfg.paths.eval
    net, spec, run_info = load_published(models_dir)  # model + run.json under the shared lock, sha256 checked
    test_file = root / cfg.paths.prepared / "test.npz"
    test = load_split(test_file)
    classes = spec["classes"]
    if list(test.images.shape[1:]) != list(spec["in_shape"]):
        raise DataError(
            f"{root / cfg.paths.prepared / 'test.npz'}: images of shape {list(test.images.shape[1:])} "
            f"do not fit the model's input {spec['in_shape']}; re-run `dvc repro`"
        )
    if len(test.labels) and int(test.labels.max()) >= len(classes):
        raise DataError(
            f"{root / cfg.paths.prepared / 'test.npz'}: label {int(test.labels.max())} out of range for the model's "
            f"{len(classes)} classes; re-run `dvc repro`"
        )
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else "cpu"
    labels = torch.from_numpy(test.labels)
    logits = predict_logits(net, torch.from_numpy(test.images), device=device)
    m = classification_metrics(logits, labels)

    write_json_atomic(out / "metrics.json", {"test": m.summary})
    write_json_atomic(out / "confusion.json", confusion_records(labels, logits.argmax(1), classes))
    write_text_atomic(out / "per_class.csv", per_class_csv(m, classes))
    plot_confusion(m.confusion.numpy(), classes, out / "confusion.png")
    run_id = run_info.get("run_id") if run_info else None
    model_label = spec["model"].get("arch") or spec["model"]["name"]  # a timm network by its architecture
    report = report_content(m, classes, len(labels), run_id, model_label)
    write_text_atomic(out / "report.md", render_markdown(report))  # for git and editors: links confusion.png
    write_text_atomic(out / "report.html", render_html(report, (out / "confusion.png").read_bytes()))  # for MLflow

    if run_id:
        run = log_into_run(cfg.tracking.uri, root, run_id)
        run.log_metrics({f"test/{k}": v for k, v in m.summary.items()}, step=0)
        run.log_inputs(split_inputs(cfg.data.name, {"test": (test_file, test)}), root)
        f1_names = per_class_metric_names("test/f1", classes)  # class names are data: made MLflow-safe
        run.log_metrics(dict(zip(f1_names, m.per_class["f1"], strict=True)), step=0)
        for name in ("metrics.json", "per_class.csv", "confusion.png", "confusion.json", "report.md", "report.html"):
            run.log_artifact(out / name, "eval")
        run.set_tags({"cnnpipe.evaluated": "true"})
        if cfg.tracking.register:
            register(cfg, root, run_id, m.summary)
    reports = f"{out / 'report.md'}, {out / 'report.html'}"
    info("evaluate", f"test split, {len(labels)} images:\n{summary_table(m)}\n  report: {reports}")
    return m.summary
