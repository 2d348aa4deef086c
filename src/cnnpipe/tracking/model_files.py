"""A logged model's files (model.safetensors + model.json) downloaded from MLflow, for tools that need the
weights rather than a loaded pyfunc model (the ONNX export), with the run and registered version they came from.
Apart from registry.py so that the pipeline's stages, which load registry.py, do not depend on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from cnnpipe.errors import CnnpipeError
from cnnpipe.redact import mask_secrets
from cnnpipe.tracking.registry import load_failure, loadable_uri, local_store_path
from cnnpipe.tracking.runs import connect
from cnnpipe.tracking.uri import resolve_tracking_uri


def missing_store(configured_uri: str | None, project_root: Path) -> str | None:
    """The (masked) tracking URI when it names an SQLite file that does not exist, else None. MLflow would create
    an empty store there and then not find the run or model asked for: a reader says what is missing instead."""
    uri = resolve_tracking_uri(configured_uri, project_root)
    store = local_store_path(uri) if uri.startswith("sqlite:///") else None
    return mask_secrets(uri) if store is not None and not store.is_file() else None


@dataclass(frozen=True)
class ModelFiles:
    """A logged model's `model.safetensors` + `model.json`, downloaded, and where they came from."""

    folder: Path  # holds model.safetensors + model.json, as the train stage wrote them
    run_id: str | None  # the train run that logged the model
    model_id: str | None  # MLflow's logged model id (m-...)
    name: str | None  # the registered model, when the source named a version of one (alias, number, latest)
    version: str | None


def download_model_files(source: str, configured_uri: str | None, project_root: Path, dest: Path) -> ModelFiles:
    """Download the logged model behind `source` (any reference `load_pyfunc` takes) into the folder `dest` and
    say which run logged it and which registered version it is: an export needs the weights, not a loaded pyfunc,
    and logs back to that run. User errors name the source and the store, as `load_pyfunc`'s do."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from cnnpipe.tracking.pyfunc_model import MODEL_ARTIFACT

    missing = missing_store(configured_uri, project_root)
    if missing is not None:
        raise CnnpipeError(f"{source}: no MLflow store at {missing} (run the pipeline, or set tracking.uri)")
    client, uri = connect(configured_uri, project_root)
    where = mask_secrets(uri)
    name: str | None = None
    version: str | None = None
    try:
        model_uri = loadable_uri(client, source, where)
        if model_uri.startswith("models:/"):
            found = get_model_name_and_version(client, model_uri)  # alias, number, `latest`, stage; or a model id
            if len(found) == 2:
                name, version = str(found[0]), str(found[1])
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(dest), tracking_uri=uri))
        meta = Model.load(str(local))
    except MlflowException as exc:
        raise load_failure(source, where, exc) from None
    artifacts = meta.flavors.get("python_function", {}).get("artifacts") or {}
    folder = local / str(artifacts.get(MODEL_ARTIFACT, {}).get("path", ""))
    if MODEL_ARTIFACT not in artifacts or not folder.is_dir():
        raise CnnpipeError(f"{source}: not a cnnpipe model (no {MODEL_ARTIFACT} artifact) in {where}")
    return ModelFiles(folder, meta.run_id, getattr(meta, "model_id", None), name, version)
