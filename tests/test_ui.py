"""The MLflow UI over a pipeline's store (`make ui`'s command): its REST API has the runs, params, metric
histories, sweep nesting and registry aliases, and the React app renders them in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import BIN, CHROMIUM_FLAGS, Server, free_port, stage_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(trained_project: Path) -> Path:
    return trained_project


@pytest.fixture(scope="module")
def ui(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make ui`'s server over the test project's store: one worker, no job runner, loopback only."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}"]
    cmd += ["--default-artifact-root", str(project / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    env = {**stage_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = tmp_path_factory.mktemp("ui") / "server.log"
    with Server(cmd, f"http://127.0.0.1:{port}/health", log, env):
        yield f"http://127.0.0.1:{port}"


def api(base: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if body is not None:
        reply = requests.post(url, json=body, timeout=30)
    else:
        reply = requests.get(url, params=query, timeout=30)
    assert reply.status_code == 200, (endpoint, reply.text[:500])
    return reply.json()


def as_dict(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["key"]: e["value"] for e in entries}


@pytest.fixture(scope="module")
def runs(ui: str) -> tuple[str, list[dict[str, Any]]]:
    """The experiment id and every run in it, as the UI's REST API returns them."""
    exp_id = api(ui, "experiments/get-by-name", experiment_name="cnnpipe-digits")["experiment"]["experiment_id"]
    found = api(ui, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000})["runs"]
    return exp_id, found


def by_stage(found: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    return [r for r in found if as_dict(r["data"].get("tags", [])).get("cnnpipe.stage") == stage]


def test_rest_api_has_runs_params_metric_histories_and_sweep_nesting(
    ui: str, project: Path, runs: tuple[str, list[dict[str, Any]]]
) -> None:
    _, found = runs
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    (train,) = [r for r in by_stage(found, "train") if r["info"]["run_id"] == run_id]
    assert train["info"]["status"] == "FINISHED"
    params = as_dict(train["data"]["params"])
    assert {"optim.lr", "data.batch_size", "model.name", "train.epochs", "data.num_classes"} <= set(params)
    epochs = int(params["train.epochs"])
    for key in ("train/loss", "val/loss", "val/acc", "val/f1_macro"):
        history = api(ui, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        assert sorted(m["step"] for m in history) == list(range(epochs)), key
    metrics = as_dict(train["data"]["metrics"])
    test_acc = json.loads((project / "eval/metrics.json").read_text())["test"]["acc"]
    assert metrics["test/acc"] == pytest.approx(test_acc)

    # The sweep: one parent run, a child per trial (mlflow.parentRunId), and the train run points at it.
    (sweep,) = by_stage(found, "sweep")
    trials = by_stage(found, "trial")
    assert len(trials) == 2
    assert {as_dict(t["data"]["tags"])["mlflow.parentRunId"] for t in trials} == {sweep["info"]["run_id"]}
    assert as_dict(train["data"]["tags"])["cnnpipe.sweep_run_id"] == sweep["info"]["run_id"]
    for trial in trials:
        assert api(ui, "metrics/get-history", run_id=trial["info"]["run_id"], metric_key="val/acc")["metrics"]

    # The registry behind the UI's Models page: champion is this run's model.
    champion = api(ui, "registered-models/alias", name="cnnpipe-digits", alias="champion")["model_version"]
    assert champion["run_id"] == run_id


def dump_dom(chromium: str, url: str, profile: Path, budget_ms: int) -> str:
    """The page's DOM after `budget_ms` of virtual time; chromium and its helpers are killed however it ends."""
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    proc = subprocess.Popen(
        [*cmd, "--dump-dom", url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    return out.decode("utf-8", errors="replace")


def visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", text).split())


def rendered(chromium: str, url: str, profile: Path, wanted: list[str]) -> str:
    """The rendered text of `url`, retried once with more virtual time if the app had not drawn `wanted` yet."""
    text = ""
    for budget in (15000, 30000):
        text = visible_text(dump_dom(chromium, url, profile, budget))
        if all(w in text for w in wanted):
            break
    return text


def test_browser_renders_the_run_names_and_the_champion(
    ui: str, chromium: str, runs: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    exp_id, found = runs
    # MLflow 3's experiment page opens on an overview tab; the runs table is its `runs` tab.
    names = sorted({r["info"]["run_name"] for r in by_stage(found, "train") + by_stage(found, "sweep")})
    assert any(n.startswith("train-") for n in names) and any(n.startswith("sweep-") for n in names)
    text = rendered(chromium, f"{ui}/#/experiments/{exp_id}/runs", tmp_path / "profile", names)
    for name in names:
        assert name in text, f"run {name!r} not rendered; page text: {text[:1500]}"
    text = rendered(chromium, f"{ui}/#/models/cnnpipe-digits", tmp_path / "profile", ["champion"])
    assert "cnnpipe-digits" in text and "champion" in text and "candidate" in text, text[:1500]
