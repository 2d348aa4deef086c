"""Export a trained model for apps: one ONNX file taking uint8 images, and `preprocessing.json` beside it.

The graph takes images as prepare stores them, uint8 (N, C, H, W) at the model's `in_shape`, N free, and answers
`probabilities` (softmax over the classes, in `classes` order) and `logits`. Everything the Python predictor does
after decoding is inside: x / 255, the network's own centre crop and mean/std (its Normalize layer), softmax. What
an app does before (decode, channels, central square, resize with the model's interpolation) is spelled out in
`preprocessing.json`, with the classes, the names, the opset, the model it came from and the agreement measured.

Why both outputs: probabilities are what predict.py and the MLflow server report and what an app shows, and their
absolute tolerance means the same for every model; logits are kept for what softmax loses (temperature scaling,
ensembling, margins of saturated predictions). The exporter is torch's own `torch.export`-based one
(`dynamo=True`, onnxscript): the default since torch 2.9, the TorchScript one is deprecated ("will be removed")
and traces shapes as Python numbers with warnings; the new one handles cnnpipe's families and timm's ResNet,
EfficientNet and ViT with a symbolic batch dimension (measured: docs/benchmarks.md).

Nothing is trusted unchecked: onnxruntime and PyTorch run the same real images (the project's test split when
its images fit the model, else `--images`), and the export is kept only when every probability agrees within the
tolerance (DEFAULT_TOLERANCE) and one image at a time gives the rows a batch gives. It is written to a temporary
folder that replaces the output folder only then; the files are logged to the train run that logged the model.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnpipe.atomic import atomic_dir, write_json_atomic
from cnnpipe.config import Config
from cnnpipe.errors import CnnpipeError, DataError
from cnnpipe.models.store import load_published

EXPORT_DIR = "export"  # default output: export/<name>-v<version> in the project (git ignores it)
ONNX_FILE = "model.onnx"
ONNX_DATA = f"{ONNX_FILE}.data"  # the weights, only for a model past protobuf's 2 GiB limit
RECORD_FILE = "preprocessing.json"
EXPORT_FILES = (ONNX_FILE, ONNX_DATA, RECORD_FILE)
ARTIFACT_PATH = "onnx"  # where in the train run's artifacts the files go
INPUT = "images"
OUTPUTS = ("probabilities", "logits")
# The lowest opset torch's exporter writes natively (an older one goes through onnx's version converter, which
# lacks adapters for common operators: Reshape below 14): the one the most runtimes load.
OPSET = 18
# Max |probability difference| allowed between onnxruntime and PyTorch. float32 spaces numbers just below 1 by
# 6e-8; measured on this project's CPU (docs/benchmarks.md): 6.6e-7 for the digits CNN and 7.7e-7 for a trained
# timm test_resnet over their test splits, 6.9e-6 for an untrained ViT-B/16 at 224 px (longer float32 sums, done
# in another order). 1e-4 leaves over ten times the largest for other CPUs and runtimes and still catches a real
# mistake: a missing /255 moved probabilities by up to 0.7, one class bias off by 0.5 by 0.12 (tests/test_export.py).
DEFAULT_TOLERANCE = 1e-4
BATCH_ROWS = 8  # images compared one at a time against the same rows of one batch: the batch axis is really free
CHUNK = 256  # images per runtime call in the comparison
FORMAT = "cnnpipe-onnx/1"
TAG = "cnnpipe.onnx_{}"  # run tags: max_abs_diff, top1_agreement, images, tolerance, artifact


class ExportCheckError(CnnpipeError):
    """onnxruntime does not answer as PyTorch does: the export is not kept."""


class UInt8Classifier(nn.Module):
    """The network with what the predictor does around it: uint8 pixels / 255 in, softmax out (and the logits).
    `ImagePredictor.probabilities` computes exactly this in PyTorch."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(images.float() / 255.0).float()
        return logits.softmax(dim=1), logits


@dataclass
class ModelSource:
    """A model to export and where it came from (what preprocessing.json and the default folder name say)."""

    net: nn.Module
    spec: dict[str, Any]
    reference: str  # as given (or the default champion URI)
    run_id: str | None  # the train run that made it: where the export is logged
    model_id: str | None = None
    name: str | None = None  # registered model and version, when the reference named one
    version: str | None = None
    local: bool = False  # a models folder, not an MLflow reference

    def provenance(self) -> dict[str, str | None]:
        return {
            "reference": self.reference,
            "registered_model": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "model_id": self.model_id,
        }


@dataclass
class CheckImages:
    images: np.ndarray  # uint8 (N, C, H, W) at the model's in_shape
    origin: str  # for people: the file or folder they came from
    skipped: int = 0  # files of an --images folder that could not be decoded


@dataclass
class Agreement:
    """onnxruntime against PyTorch on the same images."""

    images: int
    max_abs_diff_probabilities: float
    max_abs_diff_logits: float
    logit_scale: float  # max |logit| seen: the logits' difference is judged relative to it
    top1_agreement: float  # fraction of images whose top class is the same
    batch_rows: int  # rows compared one image at a time against a batch
    max_abs_diff_batch: float  # max |probability difference| between those two ways
    tolerance: float

    @property
    def ok(self) -> bool:
        scaled = self.max_abs_diff_logits / max(1.0, self.logit_scale)
        return max(self.max_abs_diff_probabilities, self.max_abs_diff_batch, scaled) <= self.tolerance


@dataclass
class ExportReport:
    out: Path
    source: ModelSource
    check: Agreement
    export_seconds: float
    logged_run: str | None  # the run the files were logged to, or None


def export_onnx(net: nn.Module, path: Path, example: np.ndarray, metadata: dict[str, str] | None = None) -> float:
    """Write `net` wrapped in UInt8Classifier as ONNX to `path`, batch dimension symbolic, `metadata` in the
    file's metadata_props; returns the seconds it took. `example`: a few uint8 (N, C, H, W) images of the model's
    shape (two are used: a batch of 1 could be specialised). One file, unless the weights pass protobuf's 2 GiB
    limit: then torch writes them beside it (model.onnx.data)."""
    x = torch.from_numpy(np.array(example[:2] if len(example) >= 2 else np.repeat(example[:1], 2, axis=0)))
    model = UInt8Classifier(net.cpu().eval()).eval()
    start = time.perf_counter()
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        input_names=[INPUT],
        output_names=list(OUTPUTS),
        opset_version=OPSET,
        dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
        verbose=False,
    )
    if program is None:  # only the legacy exporter returns None
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    program.model.metadata_props.update(metadata or {})
    program.save(str(path), external_data=False)  # False: torch still splits a model past 2 GiB
    return time.perf_counter() - start


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many as torch: a fair comparison, a fair neighbour
    options.log_severity_level = 3  # errors only: its graph-optimisation notices are not the user's business
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(path: Path, net: nn.Module, images: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> Agreement:
    """Run `images` through the ONNX file with onnxruntime and through `net` with PyTorch (the same /255 and
    softmax), CHUNK at a time; then the first BATCH_ROWS one at a time through onnxruntime against their rows of a
    batch."""
    import onnx

    onnx.checker.check_model(str(path))  # a damaged or invalid file: onnx's own error
    session = _session(path)
    model = UInt8Classifier(net.cpu().eval()).eval()
    diff_p = diff_l = scale = 0.0
    same = 0
    for i in range(0, len(images), CHUNK):
        x = np.array(images[i : i + CHUNK])  # a writable copy: the test split is memory-mapped read-only
        with torch.inference_mode():
            p_ref, l_ref = (t.numpy() for t in model(torch.from_numpy(x)))
        p_ort, l_ort = session.run(list(OUTPUTS), {INPUT: x})
        diff_p = max(diff_p, float(np.abs(p_ort - p_ref).max()))
        diff_l = max(diff_l, float(np.abs(l_ort - l_ref).max()))
        scale = max(scale, float(np.abs(l_ref).max()))
        same += int((p_ort.argmax(axis=1) == p_ref.argmax(axis=1)).sum())
    rows = np.array(images[:BATCH_ROWS])
    if len(rows) < 2:
        rows = np.repeat(rows, 2, axis=0)
    batched = session.run([OUTPUTS[0]], {INPUT: rows})[0]
    single = np.concatenate([session.run([OUTPUTS[0]], {INPUT: rows[j : j + 1]})[0] for j in range(len(rows))])
    return Agreement(
        images=len(images),
        max_abs_diff_probabilities=diff_p,
        max_abs_diff_logits=diff_l,
        logit_scale=scale,
        top1_agreement=same / len(images),
        batch_rows=len(rows),
        max_abs_diff_batch=float(np.abs(batched - single).max()),
        tolerance=tolerance,
    )


def _onnx_io(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The graph's input, outputs (name, dtype, shape with the symbolic batch named) and opset, read back."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "dtype": dtype, "shape": shape}

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return describe(model.graph.input[0]), [describe(o) for o in model.graph.output], int(opset)


def preprocessing(spec: dict[str, Any]) -> dict[str, Any]:
    """The steps an app takes from an image file to the graph's input (cnnpipe.data.images.decode_image's, for a
    reader with no Python), what the graph then does itself, and the classes in output order."""
    channels, height, width = (int(d) for d in spec["in_shape"])
    interpolation = str(spec.get("interpolation", "bilinear"))
    square = "input_size" in spec  # a spec without the preprocessing record: trained on whole images, squashed
    gray = "grey, Pillow's convert('L'): L = (299 R + 587 G + 114 B) / 1000"
    steps = [
        "decode the image file and apply its EXIF orientation",
        "16-bit or float images: stretch their own min..max to 0..255",
        "an alpha channel (RGBA, LA, transparent palette): composite over black",
        f"convert to {gray if channels == 1 else 'RGB'}",
        "take the central square (side: the image's shorter side; left = (width - side) // 2, top likewise)"
        if square
        else "keep the whole image (the resize squashes it to a square: this model was trained so)",
        f"resize to {width}x{height} with {interpolation} interpolation (Pillow's resize, reducing_gap=3.0; "
        "any antialiased resize of the same kind comes close)",
        f"uint8 values 0..255, channels first: shape (N, {channels}, {height}, {width}), any N",
    ]
    inside = [
        "x / 255",
        f"centre crop to {int(spec.get('input_size', height))} px (when smaller than the input)",
        f"(x - mean) / std per channel, mean {spec['mean']}, std {spec['std']}",
        "the network",
        "softmax over the classes -> probabilities (logits: the network's output before it)",
    ]
    return {
        "classes": [str(c) for c in spec["classes"]],
        "preprocessing": {
            "steps": steps,
            "channels": channels,
            "size": [height, width],
            "central_square": square,
            "interpolation": interpolation,
        },
        "in_the_graph": inside,
    }


def onnx_metadata(spec: dict[str, Any]) -> dict[str, str]:
    """What the ONNX file itself carries (metadata_props): the classes and preprocessing, so the file alone is
    enough for an app that reads its metadata."""
    described = preprocessing(spec)
    return {"cnnpipe.format": FORMAT, **{f"cnnpipe.{k}": json.dumps(v) for k, v in described.items()}}


def preprocessing_record(
    path: Path, source: ModelSource, check: Agreement, images: CheckImages, export_seconds: float
) -> dict[str, Any]:
    """What preprocessing.json says: `preprocessing(spec)`, the graph's input and outputs as written, the opset,
    where the model came from and how well onnxruntime agreed with PyTorch."""
    described = preprocessing(source.spec)
    graph_input, graph_outputs, opset = _onnx_io(path)
    return {
        "format": FORMAT,
        "model_file": ONNX_FILE,
        "classes": described["classes"],
        "input": {**graph_input, "layout": "NCHW", "range": [0, 255]},
        "outputs": graph_outputs,
        "opset": opset,
        "preprocessing": described["preprocessing"],
        "in_the_graph": described["in_the_graph"],
        "source": source.provenance(),
        "check": {
            **asdict(check),
            "ok": check.ok,
            "images_from": images.origin,
            "images_skipped": images.skipped,
            "runtime": f"onnxruntime {version('onnxruntime')} CPUExecutionProvider",
            "reference": f"torch {torch.__version__}",
            "machine": platform.machine(),
            "export_seconds": round(export_seconds, 2),
        },
    }


def check_images(spec: dict[str, Any], cfg: Config | None, root: Path | None, folder: Path | None) -> CheckImages:
    """Real images to compare on: `folder`'s image files decoded as predict.py decodes them when given, else the
    project's test split when its images have the model's shape; else a DataError saying what to give."""
    in_shape = [int(d) for d in spec["in_shape"]]
    if folder is not None:
        return _folder_images(folder, spec)
    if cfg is None or root is None:
        raise DataError("no images to check the export on: not in a cnnpipe project (no test split); give --images")
    from cnnpipe.data.store import load_split

    test = root / cfg.paths.prepared / "test.npz"
    if not test.is_file():
        raise DataError(f"{test}: no test split to check the export on; run `dvc repro prepare` or give --images")
    split = load_split(test, mmap=True)
    if list(split.images.shape[1:]) != in_shape:
        raise DataError(
            f"{test}: images of shape {list(split.images.shape[1:])}, the model takes {in_shape} (another data "
            "set?); give --images FOLDER with images of the model's kind"
        )
    return CheckImages(np.asarray(split.images), _shown(test))


def _folder_images(folder: Path, spec: dict[str, Any]) -> CheckImages:
    from cnnpipe.data.inputs import to_batch
    from cnnpipe.serving.predict import image_files

    files = image_files(folder)  # DataError when not a folder
    if not files:
        raise DataError(f"{folder}: no image files to check the export on")
    blobs = []
    for path in files:
        try:
            blobs.append(path.read_bytes())
        except OSError:
            blobs.append(b"")  # undecodable: skipped below, as an unreadable file
    in_shape = [int(d) for d in spec["in_shape"]]
    batch = to_batch(
        blobs, in_shape, interpolation=str(spec.get("interpolation", "bilinear")), square="input_size" in spec
    )
    good = np.array([e is None for e in batch.errors])
    if not good.any():
        raise DataError(f"{folder}: none of its {len(files)} image file(s) could be decoded ({batch.errors[0]})")
    return CheckImages(batch.images[good], str(folder), int((~good).sum()))


def _shown(path: Path) -> str:
    from cnnpipe.serving.predict import shown

    return shown(path)


def resolve_source(reference: str, cfg: Config | None, root: Path | None, scratch: Path) -> ModelSource:
    """The model `reference` names (as predict.py takes them), its weights downloaded into `scratch` when it is
    an MLflow reference."""
    from cnnpipe.serving.predict import mlflow_project, models_folder

    folder = models_folder(reference)
    if folder is not None:
        net, spec, run = load_published(folder)
        run_id = run.get("run_id") if run else None
        return ModelSource(net, spec, reference, str(run_id) if run_id else None, local=True)
    from cnnpipe.models.store import load_model
    from cnnpipe.tracking.model_files import download_model_files

    cfg, root = mlflow_project(reference, cfg, root)
    files = download_model_files(reference, cfg.tracking.uri, root, scratch)
    net, spec = load_model(files.folder)
    return ModelSource(net, spec, reference, files.run_id, files.model_id, files.name, files.version)


def default_out(source: ModelSource, root: Path | None) -> Path:
    """`export/<registered name>-v<version>`, `export/run-<run id>` or `export/<models folder name>`, in the
    project (`./export/` when there is none)."""
    if source.name and source.version:
        name = f"{source.name}-v{source.version}"
    elif source.run_id and not source.local:
        name = f"run-{source.run_id}"
    else:
        name = Path(source.reference).expanduser().resolve().name or "model"
    return (root if root is not None else Path()) / EXPORT_DIR / name


def _run_logger(source: ModelSource, cfg: Config | None, root: Path | None) -> Any:
    """Where the export is logged: the model's train run, or None (a models folder with no run.json, no project,
    or a run.json naming a run this project's store does not have: said on stderr)."""
    from cnnpipe.console import warn

    if source.run_id is None:
        return None
    if cfg is None or root is None:
        warn("export", f"run {source.run_id}: not logged to MLflow (no cnnpipe project here for the tracking URI)")
        return None
    from cnnpipe.tracking.model_files import missing_store
    from cnnpipe.tracking.runs import log_into_run

    try:
        missing = missing_store(cfg.tracking.uri, root)
        if missing is not None:
            raise DataError(f"run {source.run_id}: no MLflow store at {missing}")
        return log_into_run(cfg.tracking.uri, root, source.run_id)
    except DataError as exc:
        if not source.local:
            raise
        warn("export", f"not logged to MLflow: {exc}")
        return None


def run_export(
    model: str | None,
    out: Path | None,
    images: Path | None,
    root: Path | None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """What `pipelines/export.py` does: resolve the model (default: the configured dataset's champion), export it,
    check it on real images, write `out` (default: `default_out`) as a whole or not at all, log it to the model's
    train run; say what happened on stderr."""
    from cnnpipe.config import load_config
    from cnnpipe.console import info
    from cnnpipe.serving.predict import model_or_champion

    if images is not None and not images.is_dir():  # the cheap mistakes first
        raise DataError(f"{images}: not a folder (--images)")
    if out is not None and out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file; --out names the folder to write")
    cfg = load_config([], root=root) if root is not None else None
    model = model_or_champion(model, cfg)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-export-") as scratch:
        source = resolve_source(model, cfg, root, Path(scratch))
        run = _run_logger(source, cfg, root)
        check = check_images(source.spec, cfg, root, images)
        target = out if out is not None else default_out(source, root)
        where = _shown(target) if out is None else str(target)  # a default as the user would type it
        with atomic_dir(target, names=EXPORT_FILES) as staging:
            seconds = export_onnx(source.net, staging / ONNX_FILE, check.images, onnx_metadata(source.spec))
            agreement = compare(staging / ONNX_FILE, source.net, check.images, tolerance)
            if not agreement.ok:
                raise ExportCheckError(
                    f"{model}: onnxruntime disagrees with PyTorch on {agreement.images} image(s) of {check.origin}: "
                    f"max |probability difference| {agreement.max_abs_diff_probabilities:.2e}, logits "
                    f"{agreement.max_abs_diff_logits:.2e} (scale {agreement.logit_scale:.3g}), batch of 1 vs "
                    f"{agreement.batch_rows} {agreement.max_abs_diff_batch:.2e}; tolerance {tolerance:.1e}; "
                    f"nothing written to {where}"
                )
            record = preprocessing_record(staging / ONNX_FILE, source, agreement, check, seconds)
            write_json_atomic(staging / RECORD_FILE, record)
            if run is not None:  # before the folder lands: a store that fails leaves no unlogged export behind
                for name in EXPORT_FILES:
                    if (staging / name).is_file():
                        run.log_artifact(staging / name, ARTIFACT_PATH)
                run.set_tags(_tags(agreement))
    named = f"{source.name} v{source.version}, " if source.name else ""
    info("export", f"{model} ({named}run {source.run_id or 'unknown'}) -> {where}/{ONNX_FILE} ({seconds:.1f} s)")
    info(
        "export",
        f"onnxruntime vs PyTorch on {agreement.images} image(s) of {check.origin}: max |probability difference| "
        f"{agreement.max_abs_diff_probabilities:.1e}, logits {agreement.max_abs_diff_logits:.1e}, top-1 agreement "
        f"{agreement.top1_agreement:.2%}, batch of 1 vs {agreement.batch_rows} {agreement.max_abs_diff_batch:.1e} "
        f"(tolerance {tolerance:.1e})" + (f"; {check.skipped} undecodable file(s) skipped" if check.skipped else ""),
    )
    if run is not None:
        info("export", f"logged {ARTIFACT_PATH}/{ONNX_FILE} and {ARTIFACT_PATH}/{RECORD_FILE} to run {run.run_id}")
    return ExportReport(target, source, agreement, seconds, run.run_id if run is not None else None)


def _tags(check: Agreement) -> dict[str, str]:
    return {
        TAG.format("max_abs_diff"): f"{check.max_abs_diff_probabilities:.3e}",
        TAG.format("top1_agreement"): f"{check.top1_agreement:.6f}",
        TAG.format("images"): str(check.images),
        TAG.format("tolerance"): f"{check.tolerance:g}",
        TAG.format("artifact"): f"{ARTIFACT_PATH}/{ONNX_FILE}",
    }
