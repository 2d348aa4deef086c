"""Monitoring a served model end to end, on the pipeline's own digits model: the training reference it carries,
the prediction log predict.py and the pyfunc model write, and pipelines/monitor.py's verdict on real shifts made
here (inverted, blurred, images that are no digit, one class only) against windows of unshifted test images."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bench.monitor_drift import shifted_sets
from mlflow.tracking import MlflowClient
from PIL import Image

from cnnpipe.data.store import load_split
from cnnpipe.errors import DataError
from cnnpipe.models.predictor import ImagePredictor
from cnnpipe.monitoring.drift import detect_drift
from cnnpipe.monitoring.prediction_log import LOG_ENV, JsonlLog, log_time, open_log, records
from cnnpipe.monitoring.reference import REFERENCE, load_reference
from cnnpipe.serving.monitor import claim_folder, reference_sample, run_monitor, window_sample
from cnnpipe.tracking.registry import load_pyfunc
from tests.helpers import stage_env

WINDOW = 100
ALPHA = 0.01


@pytest.fixture(scope="module")
def served(trained_project: Path) -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    """The pipeline's model with its reference, and the prediction-log records of each set as it served them."""
    predictor = ImagePredictor.from_folder(trained_project / "models")
    test = load_split(trained_project / "data/prepared/test.npz")
    logged = {}
    for name, images in shifted_sets(test.images, test.labels).items():
        frame, seen = predictor.observe(images)
        logged[name] = records(frame, seen, predictor.reference.info["model_run"])
    return predictor.reference, logged


def windows(logged: list[dict[str, Any]], n: int, size: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    size = min(size, len(logged))
    return [[logged[i] for i in rng.choice(len(logged), size=size, replace=False)] for _ in range(n)]


def test_the_train_stage_keeps_a_reference_that_travels_with_the_model(trained_project: Path) -> None:
    ref = load_reference(trained_project / "models" / REFERENCE)
    run = json.loads((trained_project / "models/run.json").read_text())
    val = load_split(trained_project / "data/prepared/val.npz")
    assert ref.info["model_run"] == run["run_id"] and ref.info["weights_sha256"] == run["weights_sha256"]
    assert ref.info["images"] == len(val.labels) and ref.classes == [str(d) for d in range(10)]
    assert ref.layer is not None and ref.axes is not None and ref.axes.shape[0] == ref.sample["embedding"].shape[1]
    # the reference's numbers are the served model's on the validation images
    frame, seen = ImagePredictor.from_folder(trained_project / "models").observe(val.images)
    np.testing.assert_allclose(ref.sample["brightness"], val.images.reshape(len(val.images), -1).mean(1) / 255)
    np.testing.assert_allclose(ref.sample["confidence"], frame["probability"].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(ref.sample["embedding"], seen.embedding, atol=1e-4)
    assert (frame["probability"] > 0).all()
    # ... and it is in the logged model, where a served copy finds it
    model = load_pyfunc("models:/cnnpipe-digits@champion", None, trained_project).unwrap_python_model()
    assert model.predictor.reference is not None and model.predictor.reference.info["model_run"] == run["run_id"]


def test_same_distribution_windows_rarely_alarm_and_every_shift_is_caught(
    served: tuple[Any, dict[str, list[dict[str, Any]]]],
) -> None:
    ref, logged = served
    rates = {}
    for name, recs in logged.items():
        n = 40 if name == "same distribution" else 15
        results = [
            detect_drift(reference_sample(ref), window_sample(w, ref)[0], len(ref.classes), alpha=ALPHA)
            for w in windows(recs, n, WINDOW)
        ]
        rates[name] = (sum(r.drift for r in results) / n, results)
    print({k: v[0] for k, v in rates.items()})
    assert rates["same distribution"][0] <= 0.05  # 2 of 40 at most; the bound is alpha = 0.01 per window
    for name in ("inverted", "blurred (sigma 1)", "not digits (photo patches)", "one class only (3s)"):
        assert rates[name][0] == 1.0, name
    # each shift is caught where it shows
    assert all(r.families["input"] for r in rates["inverted"][1])
    assert all(r.families["classes"] for r in rates["one class only (3s)"][1])
    assert all(r.families["embedding"] for r in rates["not digits (photo patches)"][1])


def test_the_log_records_what_was_served(served: tuple[Any, dict[str, list[dict[str, Any]]]], tmp_path: Path) -> None:
    ref, logged = served
    recs = logged["same distribution"]
    assert {r["model_run"] for r in recs} == {ref.info["model_run"]}
    assert all(r["width"] == 8 and r["height"] == 8 and r["image"] is None for r in recs)
    assert all(len(r["embedding"]) == ref.sample["embedding"].shape[1] for r in recs)
    log = JsonlLog(tmp_path / "log.jsonl")
    log.append(recs[:50])
    log.append([{**r, "model_run": "another-model"} for r in recs[50:80]])  # another model's records
    with (tmp_path / "log.jsonl").open("a") as fh:
        fh.write('{"time": "2026-')  # a writer killed mid-line
    log.append(recs[80:82])  # the next writer's records stay whole
    assert log.read(ref.info["model_run"], None, None) == recs[:50] + recs[80:82]
    assert log.read(ref.info["model_run"], 10, None) == recs[42:50] + recs[80:82]
    assert len(log.read(None, None, None)) == 82
    assert log.read(ref.info["model_run"], None, "9999-01-01") == []
    # a time with Z or an offset means the same instant as the log's UTC strings
    first = recs[0]["time"]
    assert log_time(first.replace("+00:00", "Z")) == first == log_time(first)
    later = log_time("2999-01-01T01:00+01:00")
    assert later == "2999-01-01T00:00:00.000+00:00"
    with pytest.raises(DataError, match="ISO 8601"):
        log_time("yesterday")
    # records a monitor cannot use are left out and counted, never a crash
    broken = [{**recs[0], "brightness": None}, {**recs[1], "width": "wide"}, {**recs[2], "class": "X"}]
    sample, skipped = window_sample(recs[3:40] + broken, ref)
    assert skipped == 3 and len(sample["brightness"]) == 37 and sample["embedding"].shape == (37, 8)


def test_a_database_log_reads_back_what_a_file_does(
    served: tuple[Any, dict[str, list[dict[str, Any]]]], pg_url: str, tmp_path: Path
) -> None:
    ref, logged = served
    recs = logged["inverted"][:40]
    for dest in (pg_url, f"sqlite:///{tmp_path / 'log.db'}"):
        log = open_log(dest)
        log.append(recs[:25])
        log.append(recs[25:])
        back = log.read(ref.info["model_run"], 30, None)
        assert [r["class"] for r in back] == [r["class"] for r in recs[10:]]
        np.testing.assert_allclose([r["embedding"] for r in back], [r["embedding"] for r in recs[10:]])
        assert log.read(ref.info["model_run"], None, recs[0]["time"]) and not log.read("other", None, None)
    # reading never creates: a database file or a table that is not there is one line
    with pytest.raises(DataError, match="no such database file"):
        open_log(f"sqlite:///{tmp_path / 'typo.db'}").read(None, None, None)
    assert not (tmp_path / "typo.db").exists()
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE other (x)").connection.commit()
    with pytest.raises(DataError, match="no table cnnpipe_predictions"):
        open_log(f"sqlite:///{tmp_path / 'empty.db'}").read(None, None, None)


def test_concurrent_writers_never_interleave_a_line(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from cnnpipe.monitoring.prediction_log import JsonlLog\n"
        "log = JsonlLog(Path(sys.argv[1]))\n"
        "for i in range(200): log.append([{'writer': sys.argv[2], 'i': i, 'pad': 'x' * 5000}] * 3)\n"
    )
    path = tmp_path / "log.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), w], env=stage_env()) for w in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 1200 and all(json.loads(line)["pad"] == "x" * 5000 for line in lines)


def test_a_model_without_a_reference_and_a_short_window_are_one_line(
    served: tuple[Any, dict[str, list[dict[str, Any]]]], tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="no training reference"):
        load_reference(tmp_path / REFERENCE)
    (tmp_path / REFERENCE).write_bytes(b"not a reference")
    with pytest.raises(DataError, match="not a cnnpipe training reference"):
        load_reference(tmp_path / REFERENCE)
    ref, logged = served
    with pytest.raises(DataError, match="30"):
        detect_drift(reference_sample(ref), window_sample(logged["inverted"][:12], ref)[0], 10)


def test_two_monitors_at_once_never_share_a_report_folder(tmp_path: Path) -> None:
    first, second = claim_folder(None, tmp_path), claim_folder(None, tmp_path)
    assert first != second and first.is_dir() and second.is_dir() and first.parent == tmp_path / "monitor/reports"
    with pytest.raises(DataError, match="exists"):
        claim_folder(first, tmp_path)


def monitor_cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "pipelines/monitor.py", *args], cwd=project, env=stage_env(), capture_output=True, text=True
    )


def predict_cli(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "pipelines/predict.py", *args],
        cwd=project,
        env={**stage_env(), **(env or {})},
        capture_output=True,
        text=True,
    )


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0]).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_predict_logs_then_monitor_flags_drift_with_exit_1(fresh_trained_project: Path, tmp_path: Path) -> None:
    project = fresh_trained_project
    test = load_split(project / "data/prepared/test.npz")
    same = write_pngs(tmp_path / "same", test.images[:120])
    inverted = write_pngs(tmp_path / "inverted", 255 - test.images[120:220])

    served_log = tmp_path / "served.jsonl"  # a server's setting in the shell does not make --no-log log
    assert predict_cli(project, str(same), "--no-log", env={LOG_ENV: str(served_log)}).returncode == 0
    assert not (project / "monitor").exists() and not served_log.exists()  # --no-log: nothing
    done = predict_cli(project, str(same))  # the champion, from the registry; the default log
    assert done.returncode == 0, done.stderr
    log = project / "monitor/predictions.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(recs) == 120 and {r["model_version"] for r in recs} == {"1"}
    assert "logged to monitor/predictions.jsonl" in done.stderr

    ok = monitor_cli(project, "--out", str(tmp_path / "r1"))
    assert ok.returncode == 0, ok.stderr
    assert "no drift" in ok.stderr and (tmp_path / "r1/report.md").is_file()

    kept = tmp_path / "kept"
    assert predict_cli(project, str(inverted), "--model", "models", "--log-images", str(kept)).returncode == 0
    assert len(list(kept.glob("*.png"))) == 100
    drift = monitor_cli(project, "--since", "2000-01-01")  # --since alone: every record since, no 500 cap
    assert drift.returncode == 1, drift.stderr
    assert "DRIFT: " in drift.stderr and "input" in drift.stderr and "220 prediction(s)" in drift.stderr
    reports = list((project / "monitor/reports").iterdir())
    assert len(reports) == 1 and "DRIFT" in (reports[0] / "report.md").read_text()

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    train_run = json.loads((project / "models/run.json").read_text())["run_id"]
    experiment = client.get_run(train_run).info.experiment_id
    runs = client.search_runs([experiment], "tags.`cnnpipe.stage` = 'monitor'", order_by=["start_time ASC"])
    assert [r.data.tags["cnnpipe.drift"] for r in runs] == ["no", "yes"]
    assert runs[0].data.params["alpha"] == "0.01" and runs[0].data.params["last"] == "500"
    assert runs[1].data.params["last"] == "None" and runs[1].data.params["since"].startswith("2000-01-01T00:00")
    assert all(r.info.status == "FINISHED" and r.data.tags["cnnpipe.model_run"] == train_run for r in runs)
    assert runs[1].data.metrics["drift/any"] == 1.0 and runs[1].data.metrics["drift/input"] == 1.0
    artifacts = {a.path for a in client.list_artifacts(runs[1].info.run_id, "monitor")}
    assert "monitor/report.md" in artifacts


def test_monitor_refuses_in_one_line_and_writes_nothing(trained_project: Path, tmp_path: Path) -> None:
    missing = monitor_cli(trained_project, "--log", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no prediction log" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(DataError, match="needs at least 30"):
        run_monitor(None, str(tmp_path / "log.jsonl"), trained_project)
    with pytest.raises(DataError, match="exists"):
        run_monitor(None, str(tmp_path / "log.jsonl"), trained_project, out=tmp_path)
    with pytest.raises(DataError, match="ISO 8601"):
        run_monitor(None, str(tmp_path / "log.jsonl"), trained_project, since="yesterday")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    assert not (trained_project / "monitor/reports").exists()


def test_a_loaded_model_logs_only_when_the_environment_says_where(
    trained_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    test = load_split(trained_project / "data/prepared/test.npz")
    monkeypatch.delenv(LOG_ENV, raising=False)
    quiet = load_pyfunc("models:/cnnpipe-digits@champion", None, trained_project)
    assert quiet.unwrap_python_model().logging_to is None  # off by default
    quiet.predict(test.images[:5])
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "log.jsonl"))
    model = load_pyfunc("models:/cnnpipe-digits@champion", None, trained_project)
    model.predict(test.images[:5])
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 5
    # a log that cannot be written: the answers still come, with one warning
    (tmp_path / "blocked").write_text("a file where the log's folder would be")
    monkeypatch.setenv(LOG_ENV, str(tmp_path / "blocked" / "log.jsonl"))
    blocked = load_pyfunc("models:/cnnpipe-digits@champion", None, trained_project)
    assert len(blocked.predict(test.images[:5])) == 5
    assert any("prediction log" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


@pytest.mark.slow
def test_the_http_server_logs_when_configured(trained_project: Path, tmp_path: Path) -> None:
    import base64

    import requests

    from tests.helpers import BIN, Server, free_port, png_bytes, server_env

    log = tmp_path / "served.jsonl"
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/cnnpipe-digits@champion", "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port)]
    env = {**server_env(trained_project), LOG_ENV: str(log), "CNNPIPE_MODEL_VERSION": "1"}
    test = load_split(trained_project / "data/prepared/test.npz")
    payload = {"inputs": [base64.b64encode(png_bytes(img[0])).decode() for img in test.images[:40]]}
    with Server(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env):
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert reply.status_code == 200, reply.text
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    answers = reply.json()["predictions"]
    assert [r["class"] for r in recs] == [a["class"] for a in answers]
    run = json.loads((trained_project / "models/run.json").read_text())["run_id"]
    assert {r["model_run"] for r in recs} == {run} and {r["model_version"] for r in recs} == {"1"}
    assert all(r["image"] is None and len(r["embedding"]) == 8 for r in recs)  # never the images unless asked


def test_requests_answered_at_once_keep_their_own_embeddings(trained_project: Path) -> None:
    """The scoring server answers requests in threads on one network: each must log its own images' embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    predictor = ImagePredictor.from_folder(trained_project / "models")
    test = load_split(trained_project / "data/prepared/test.npz")
    batches = [test.images[i : i + 40] for i in range(0, 320, 40)] * 3
    alone = [predictor.observe(b)[1].embedding for b in batches]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda b: predictor.observe(b)[1].embedding, batches))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
