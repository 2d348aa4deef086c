"""The data splits a run used, as MLflow dataset inputs: the runs table's Dataset column tells runs on different
data apart, and MLflow's lineage names the same files and digests as DVC's."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from cnnpipe.data.store import Split
from cnnpipe.models.store import file_sha256

DIGEST_CHARS = 12  # MLflow shows the digest in the Dataset column: a prefix of the file's sha256 is enough there


@dataclass(frozen=True)
class SplitInput:
    """One split file as a run's input: `context` is the split's role (train, val, test)."""

    dataset: str
    context: str
    path: Path
    split: Split
    sha256: str


def dataset_input(item: SplitInput, root: Path) -> DatasetInput:
    """The MLflow entity for `item`: named `<dataset>-<context>`, digest = the file's sha256 prefix (the file DVC
    tracks), source = its path in the project, profile = rows and image shape (no pixels leave the project)."""
    try:
        where = item.path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        where = str(item.path)
    profile = {
        "num_rows": len(item.split.labels),
        "image_shape": [int(d) for d in item.split.images.shape[1:]],
        "sha256": item.sha256,
    }
    entity = Dataset(
        name=f"{item.dataset}-{item.context}",
        digest=item.sha256[:DIGEST_CHARS],
        source_type="local",
        source=json.dumps({"uri": where}),
        profile=json.dumps(profile),
    )
    return DatasetInput(entity, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=item.context)])


def split_inputs(dataset: str, splits: dict[str, tuple[Path, Split]]) -> list[SplitInput]:
    """Each split's file hashed once: `{context: (file, split loaded from it)}`."""
    return [SplitInput(dataset, context, path, split, file_sha256(path)) for context, (path, split) in splits.items()]


def combined_digest(items: list[SplitInput]) -> str:
    """One digest for the data a run used (tag `cnnpipe.data_digest`): changes when any split file changes."""
    return hashlib.sha256("\n".join(f"{i.context}:{i.sha256}" for i in items).encode()).hexdigest()
