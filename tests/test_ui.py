"""`make ui` over a pipeline's store: it prints the address of the runs table and serves it. The REST API has
the runs, params, metric histories, dataset inputs, sweep nesting and registry aliases; Playwright drives the
React app in headless Chromium from the printed address: runs table, a sweep's trials, two runs compared, the
registered model's aliases. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.helpers import BIN, ROOT, free_port, stage_env

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "test-artifacts" / "ui"
URL_LINE = re.compile(r"\[ui\] runs of (\S+): (http://\S+)")


@pytest.fixture(scope="module")
def project(trained_project: Path) -> Path:
    return trained_project


@dataclass(frozen=True)
class UI:
    base: str  # http://127.0.0.1:<port>
    runs_url: str  # what `make ui` printed


@pytest.fixture(scope="module")
def ui(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    """`make ui` itself in the project (the test venv's programs; setup marked done), its process group killed
    at the end. Its output goes to a file, read until the printed address appears and the server answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "make-ui.log"
    cmd = ["make", "-o", ".venv/.installed", f"BIN={BIN}", "ui", f"UI_PORT={port}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=project, env=stage_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base, found = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = found or URL_LINE.search(log.read_text(errors="replace"))
            try:
                if found and requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"make ui: no address or no server after 120 s:\n{log.read_text()[-3000:]}")
        assert found.group(1) == "cnnpipe-digits"
        yield UI(base, found.group(2))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


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
def runs(ui: UI) -> tuple[str, list[dict[str, Any]]]:
    """The experiment id and every run in it, as the UI's REST API returns them."""
    exp_id = api(ui.base, "experiments/get-by-name", experiment_name="cnnpipe-digits")["experiment"]["experiment_id"]
    found = api(ui.base, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000})["runs"]
    return exp_id, found


def by_stage(found: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    return [r for r in found if as_dict(r["data"].get("tags", [])).get("cnnpipe.stage") == stage]


def test_rest_api_has_runs_params_metric_histories_and_sweep_nesting(
    ui: UI, project: Path, runs: tuple[str, list[dict[str, Any]]]
) -> None:
    _, found = runs
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    (train,) = [r for r in by_stage(found, "train") if r["info"]["run_id"] == run_id]
    assert train["info"]["status"] == "FINISHED"
    params = as_dict(train["data"]["params"])
    assert {"optim.lr", "data.batch_size", "model.name", "train.epochs"} <= set(params)
    # Train and trials log the same keys (the config): MLflow's compare view then offers only those that differ.
    trial_keys = {frozenset(as_dict(t["data"]["params"])) for t in by_stage(found, "trial")}
    assert trial_keys == {frozenset(params)}
    epochs = int(params["train.epochs"])
    for key in ("train/loss", "val/loss", "val/acc", "val/f1_macro"):
        history = api(ui.base, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        assert sorted(m["step"] for m in history) == list(range(1, epochs + 1)), key  # epochs count from 1
    # Summaries (best/*, test/*) sit at step 0 in every run: MLflow charts them as bars across runs.
    for run in [train, *by_stage(found, "trial"), *by_stage(found, "sweep")]:
        for key in as_dict(run["data"]["metrics"]):
            if key.startswith(("best/", "test/")):
                history = api(ui.base, "metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)["metrics"]
                assert {m["step"] for m in history} == {0}, (run["info"]["run_name"], key)
    assert as_dict(train["data"]["tags"])["cnnpipe.best_epoch"] == str(
        json.loads((project / "models/run.json").read_text())["best_epoch"]
    )
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
        assert api(ui.base, "metrics/get-history", run_id=trial["info"]["run_id"], metric_key="val/acc")["metrics"]

    # The registry behind the UI's Models page: champion is this run's model.
    champion = api(ui.base, "registered-models/alias", name="cnnpipe-digits", alias="champion")["model_version"]
    assert champion["run_id"] == run_id


def test_make_ui_prints_the_saved_runs_view_of_a_model_development_experiment(
    ui: UI, project: Path, runs: tuple[str, list[dict[str, Any]]]
) -> None:
    exp_id, found = runs
    assert ui.runs_url == (
        f"{ui.base}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=cnnpipe-runs"
    )
    tags = as_dict(api(ui.base, "experiments/get", experiment_id=exp_id)["experiment"]["tags"])
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.cnnpipe-runs"])  # MLflow's saved-view envelope
    assert view["name"] and isinstance(view["createdAt"], int)
    columns = json.loads(view["state"])["selectedColumns"]
    space = yaml.safe_load((project / "params.yaml").read_text())["sweep"]["space"]
    assert {f"params.`{s['key']}`" for s in space.values()} <= set(columns)
    assert {"metrics.`test/f1_macro`", "metrics.`val/f1_macro`", "attributes.`Dataset`"} <= set(columns)

    # Names tell runs apart; every train and trial run lists the splits it read as dataset inputs.
    for run in by_stage(found, "train") + by_stage(found, "sweep"):
        assert re.fullmatch(r"(train|sweep)-\d{4}-\d{4}", run["info"]["run_name"]), run["info"]["run_name"]
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    (train,) = [r for r in by_stage(found, "train") if r["info"]["run_id"] == run_id]
    digests: dict[str, set[str]] = {}
    for run in [train, *by_stage(found, "trial")]:  # the pipeline's own runs (other tests add train runs)
        inputs = run["inputs"]["dataset_inputs"]
        contexts = {as_dict(i["tags"])["mlflow.data.context"]: i["dataset"] for i in inputs}
        assert {"train", "val"} <= set(contexts), run["info"]["run_name"]
        for context, dataset in contexts.items():
            assert dataset["name"] == f"digits-{context}"
            digests.setdefault(context, set()).add(dataset["digest"])
    assert all(len(d) == 1 for d in digests.values())  # the same files, the same digests, across runs
    test_input = [i for i in train["inputs"]["dataset_inputs"] if as_dict(i["tags"])["mlflow.data.context"] == "test"]
    assert test_input and json.loads(test_input[0]["dataset"]["profile"])["num_rows"] > 0  # added by evaluate


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield launched
        finally:
            launched.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_the_printed_address_shows_runs_trials_a_comparison_and_the_aliases(
    ui: UI, browser: Any, project: Path, runs: tuple[str, list[dict[str, Any]]]
) -> None:
    _, found = runs
    (sweep,) = by_stage(found, "sweep")
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    (train,) = [r for r in by_stage(found, "train") if r["info"]["run_id"] == run_id]
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(ui.runs_url)

    # The runs table (not GenAI's overview), with the saved view's columns.
    page.get_by_text(sweep["info"]["run_name"]).first.wait_for()
    page.get_by_text(train["info"]["run_name"]).first.wait_for()
    assert page.get_by_text("Detect Issues").count() == 0  # GenAI's overview page would show it
    headers = [h.get_attribute("col-id") for h in page.locator(".ag-header-cell[col-id]").all()]
    assert "attributes.`Dataset`" in headers and "metrics.`test/acc`" in headers, " | ".join(map(str, headers))
    assert page.get_by_text(re.compile(r"^digits-train \(")).count() >= 1
    shot(page, "1-runs")

    # The sweep's trials, nested under it.
    page.locator(".ag-row", has_text=sweep["info"]["run_name"]).locator("button").first.click()
    for name in ("trial-0", "trial-1"):
        page.get_by_text(name, exact=True).first.wait_for()
    shot(page, "2-sweep-expanded")

    # Two trials compared: the parallel-coordinates plot opens on the params that differ between them,
    # which are swept keys only (both runs log the same keys; no constants).
    for name in ("trial-0", "trial-1"):
        page.locator(".ag-row", has_text=name).get_by_role("checkbox").first.check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("Comparing 2 Runs").wait_for()
    controls = page.locator("body").inner_text()
    space = yaml.safe_load((project / "params.yaml").read_text())["sweep"]["space"]
    trials = {t["info"]["run_name"]: as_dict(t["data"]["params"]) for t in by_stage(found, "trial")}
    differ = sorted(k for k in trials["trial-0"] if trials["trial-0"][k] != trials["trial-1"].get(k))
    assert differ and set(differ) <= {s["key"] for s in space.values()}, differ
    for key in differ[:3]:
        assert key in controls, f"{key} not offered in the comparison"
    assert "data.num_" not in controls
    shot(page, "3-compare")

    # The registered model, with both aliases.
    page.goto(f"{ui.base}/#/models/cnnpipe-digits")
    page.get_by_text("champion").first.wait_for()
    assert page.get_by_text("candidate").count() >= 1
    shot(page, "4-models")
    page.close()
