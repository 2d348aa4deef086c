"""The evaluate stage: the trained model on the test split -> eval/ files + test/* in the train run.

Besides the numbers, pictures of what the model gets wrong: the highest-loss images (errors.png, errors.csv), the
most-confused pairs (confused.png), the reliability diagram (calibration.png, calibration.json) and
class-activation maps (cam/cam.png, or cam/not_applicable.txt saying why not). Each is an eval/ file, a section
of the report, an artifact of the train run, and a keyed MLflow image, which the run comparison shows side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cnnpipe.atomic import write_json_atomic, write_text_atomic
from cnnpipe.config import Config
from cnnpipe.console import info, warn
from cnnpipe.data.store import load_split
from cnnpipe.errors import DataError
from cnnpipe.evaluation.attribution import plot_class_activation_maps
from cnnpipe.evaluation.calibration import calibration_records, plot_reliability, reliability_bins
from cnnpipe.evaluation.gallery import GALLERY_SIZE, errors_csv, plot_confused_pairs, plot_error_gallery, rank_by_loss
from cnnpipe.evaluation.metrics import (
    TestMetrics,
    classification_metrics,
    confusion_records,
    per_class_csv,
    per_class_metric_names,
    predict_logits,
)
from cnnpipe.evaluation.plots import plot_confusion
from cnnpipe.evaluation.report import CAM_FILE, render_html, render_markdown, report_content, summary_table
from cnnpipe.models.layers import centre_crop
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


CAM_NOT_APPLICABLE = "cam/not_applicable.txt"
IMAGE_KEYS = {  # eval/ picture -> its key among the run's MLflow images
    "confusion.png": "eval/confusion",
    "errors.png": "eval/errors",
    "confused.png": "eval/confused",
    "calibration.png": "eval/calibration",
    CAM_FILE: "eval/cam",
}


def write_pictures(
    out: Path,
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    m: TestMetrics,
    classes: list[str],
    input_size: int | None,
    device: str,
) -> str | None:
    """The pictures of what the model gets wrong, into `out`; returns why there are no class-activation maps
    (None: cam/cam.png was drawn). `images`: uint8 as stored; the gallery shows the central crop the network
    saw (models/layers.py), the CAM helper crops as the network does."""
    seen = centre_crop(images, input_size).numpy()
    ranked = rank_by_loss(logits, labels, limit=GALLERY_SIZE)
    write_text_atomic(out / "errors.csv", errors_csv(ranked, classes))
    plot_error_gallery(seen, ranked, classes, out / "errors.png")
    plot_confused_pairs(seen, logits, labels, m.confusion, classes, out / "confused.png")
    bins = reliability_bins(logits, labels)
    write_json_atomic(out / "calibration.json", calibration_records(bins))
    plot_reliability(bins, m.summary["ece"], out / "calibration.png")
    (out / CAM_NOT_APPLICABLE).unlink(missing_ok=True)  # eval/cam/ holds one of the two, never a stale other
    try:
        reason = plot_class_activation_maps(net, images, labels, classes, out / CAM_FILE, device=device)
    except Exception as exc:  # a diagnostic picture: a network captum cannot trace must not cost the test metrics
        (out / CAM_FILE).unlink(missing_ok=True)
        reason = f"class-activation maps failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warn("evaluate", reason)
    else:
        if reason is not None:
            info("evaluate", reason)
    if reason is not None:
        write_text_atomic(out / CAM_NOT_APPLICABLE, reason + "\n")
    return reason


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
    labels, images = torch.from_numpy(test.labels), torch.from_numpy(test.images)
    logits = predict_logits(net, images, device=device)
    m = classification_metrics(logits, labels)

    write_json_atomic(out / "metrics.json", {"test": m.summary})
    write_json_atomic(out / "confusion.json", confusion_records(labels, logits.argmax(1), classes))
    write_text_atomic(out / "per_class.csv", per_class_csv(m, classes))
    plot_confusion(m.confusion.numpy(), classes, out / "confusion.png")
    cam_reason = write_pictures(out, net, images, labels, logits, m, classes, spec.get("input_size"), device)
    run_id = run_info.get("run_id") if run_info else None
    model_label = spec["model"].get("arch") or spec["model"]["name"]  # a timm network by its architecture
    report = report_content(m, classes, len(labels), run_id, model_label, cam_reason)
    write_text_atomic(out / "report.md", render_markdown(report))  # for git and editors: links the pictures
    pictures = {p.file: (out / p.file).read_bytes() for p in report.pictures if p.file}
    write_text_atomic(out / "report.html", render_html(report, pictures))  # for MLflow: the pictures inside

    if run_id:
        run = log_into_run(cfg.tracking.uri, root, run_id)
        run.log_metrics({f"test/{k}": v for k, v in m.summary.items()}, step=0)
        run.log_inputs(split_inputs(cfg.data.name, {"test": (test_file, test)}), root)
        f1_names = per_class_metric_names("test/f1", classes)  # class names are data: made MLflow-safe
        run.log_metrics(dict(zip(f1_names, m.per_class["f1"], strict=True)), step=0)
        files = ["metrics.json", "per_class.csv", "confusion.json", "errors.csv", "calibration.json"]
        files += [*pictures, *([CAM_NOT_APPLICABLE] if cam_reason else []), "report.md", "report.html"]
        for name in files:
            run.log_artifact(out / name, (Path("eval") / name).parent.as_posix())  # cam/cam.png -> eval/cam/
        for name in pictures:
            run.log_image(out / name, IMAGE_KEYS[name])
        run.set_tags({"cnnpipe.evaluated": "true"})
        if cfg.tracking.register:
            register(cfg, root, run_id, m.summary)
    reports = f"{out / 'report.md'}, {out / 'report.html'}"
    info("evaluate", f"test split, {len(labels)} images:\n{summary_table(m)}\n  report: {reports}")
    return m.summary
