"""`make ui`: the MLflow UI opening on this project's runs table, with the columns that tell runs apart.

MLflow 3 opens an experiment in its GenAI pages unless the UI's workflow switch says "Model training"; the
`workflowType=machine_learning` URL parameter sets that switch for the page. The columns come from a saved view:
MLflow keeps saved views as experiment tags (`mlflow.sharedViewState.<id>`, what its Views menu and share links
write) and opens one with `viewStateShareKey=<id>`. cnnpipe writes one such view, named below, from the config:
the tuned params, the test and validation metrics, the dataset; the ~90 constant params stay out of the way."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import urlencode

from cnnpipe.config import Config
from cnnpipe.tracking.names import experiment_name
from cnnpipe.tracking.runs import connect, get_or_create_experiment
from cnnpipe.tracking.uri import artifact_location

VIEW_ID = "cnnpipe-runs"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "cnnpipe: tuned params and metrics"


def column(kind: str, key: str) -> str:
    """A runs-table column id as the MLflow UI spells it: kind.`key`."""
    return f"{kind}.`{key}`"


def view_columns(cfg: Config) -> list[str]:
    """The dataset and model, the metrics the pipeline selects on (sweep, checkpoint, champion), then every
    swept config key: what differs between runs, in the order a reader compares them."""
    metrics = [
        f"test/{cfg.tracking.champion_metric}",
        "test/acc",
        "test/f1_macro",
        f"best/{cfg.sweep.metric}",
        cfg.train.monitor,
        "val/loss",
    ]
    params = ["model.name", *sorted(spec.key for spec in cfg.sweep.space.values())]
    return [
        column("attributes", "Dataset"),
        column("attributes", "Models"),
        *(column("metrics", m) for m in dict.fromkeys(metrics)),
        *(column("params", p) for p in dict.fromkeys(params)),
    ]


def saved_view(cfg: Config, now_ms: int) -> str:
    """The tag value: MLflow's saved-view envelope around the view state (search facets + runs-table state)."""
    state = {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",  # MLflow's own key for Created (no backticks), which keeps nesting
        "orderByAsc": False,
        "selectedColumns": view_columns(cfg),
    }
    return json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def runs_url(base: str, experiment_id: str) -> str:
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_ID})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def prepare_ui(cfg: Config, root: Path, base: str) -> str:
    """Write the saved view on the project's experiment (made if missing: the URL must open) and return the URL
    of its runs table."""
    client, _ = connect(cfg.tracking.uri, root)
    name = experiment_name(cfg)
    exp_id = get_or_create_experiment(client, name, artifact_location(root, name))
    client.set_experiment_tag(exp_id, VIEW_TAG, saved_view(cfg, int(time.time() * 1000)))
    return runs_url(base, exp_id)
