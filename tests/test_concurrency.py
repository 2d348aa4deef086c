"""Stages at the same time, for real: two trainings never cross their models, two evaluations register a run
once. Real processes, a real SQLite store, a real signal (SIGSTOP) to force the interleaving that crossed them."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import signal
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnpipe.data.store import load_split
from cnnpipe.models.store import load_model
from tests.helpers import poll, prepared_copy, sqlite_store, stage_runs, start_stage_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_copy(tmp_path_factory.mktemp("concurrency"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logged_weights(client: MlflowClient, run_id: str) -> Path:
    """The model.safetensors inside the MLflow model the run logged (a local artifact store)."""
    exp_id = client.get_run(run_id).info.experiment_id
    (model,) = client.search_logged_models(experiment_ids=[exp_id], filter_string=f"source_run_id = '{run_id}'")
    (weights,) = Path(unquote(urlparse(model.artifact_location).path)).rglob("model.safetensors")
    return weights


def val_f1_macro(models_dir: Path, project: Path) -> float:
    """Macro F1 on the val split (what the run logged as val/f1_macro, the default train.monitor) of the weights
    in `models_dir`."""
    from torchmetrics.classification import MulticlassF1Score

    net, spec = load_model(models_dir)
    val = load_split(project / "data/prepared/val.npz")
    with torch.no_grad():
        preds = net(torch.from_numpy(val.images).float().div_(255.0)).argmax(1)
    f1 = MulticlassF1Score(len(spec["classes"]), average="macro", validate_args=False)
    return float(f1(preds, torch.from_numpy(val.labels)))


@dataclass
class Race:
    uri: str
    first_run: str  # the run stopped between saving and logging its model, then the last to finish
    first_err: str
    other_err: str
    returncodes: tuple[int | None, int | None]


@pytest.fixture(scope="module")
def race(project: Path) -> Race:
    """Two trainings at once (different optim.lr) into the same models folder and store. The first to have
    logged its curves (its weights saved, its model not yet logged) is stopped (SIGSTOP) until the other has
    finished entirely, then continued: the interleaving that made run A log run B's weights and left run.json
    naming A beside B's weights."""
    uri_arg, uri = sqlite_store(project, "race")
    client = MlflowClient(uri)
    lrs = ["0.001", "0.004"]
    procs = {
        lr: start_stage_process(
            project, "train", uri_arg, "paths.models=models-x", "paths.checkpoints=ckpt-x", "train.epochs=1",
            f"optim.lr={lr}",
        )
        for lr in lrs
    }  # fmt: skip
    artifacts = project / "mlartifacts"
    curves: list[Path] = []

    def some_run_logged_its_curves() -> bool:
        if any(p.poll() is not None for p in procs.values()):
            return True
        curves.extend(artifacts.glob("*/*/artifacts/curves.png"))
        return bool(curves)

    poll(some_run_logged_its_curves, timeout=300, what="a run's logged curves", every=0.02)
    assert curves, {lr: p.communicate()[1][-2000:] for lr, p in procs.items()}
    first_run = curves[0].parts[-3]
    first_lr = client.get_run(first_run).data.params["optim.lr"]
    first, other = procs[first_lr], next(p for lr, p in procs.items() if lr != first_lr)
    first.send_signal(signal.SIGSTOP)
    try:
        other_err = other.communicate(timeout=300)[1]
    finally:
        first.send_signal(signal.SIGCONT)
    first_err = first.communicate(timeout=300)[1]
    return Race(uri, first_run, first_err, other_err, (first.returncode, other.returncode))


def test_two_trainings_at_once_each_log_and_publish_their_own_weights(project: Path, race: Race) -> None:
    """Issue #11 item 2: each run logs exactly the weights it trained; models/ pairs one run with its weights."""
    assert race.returncodes == (0, 0), (race.first_err[-3000:], race.other_err[-3000:])
    client = MlflowClient(race.uri)
    runs = {r.info.run_id: r for r in stage_runs(client)}
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED"}
    logged = {run_id: logged_weights(client, run_id) for run_id in runs}
    shas = {run_id: sha256(path) for run_id, path in logged.items()}
    assert len(set(shas.values())) == 2, f"both runs logged the same weights: {shas}"
    for run_id, run in runs.items():
        # The weights each run logged are the ones it trained: their val macro F1 is the run's best val/f1_macro.
        best = run.data.metrics["best/val/f1_macro"]
        assert val_f1_macro(logged[run_id].parent, project) == pytest.approx(best, abs=1e-5)
        assert run.data.tags["cnnpipe.weights_sha256"] == shas[run_id]

    # models/ holds one run's files: the last to finish (the stopped one), its id beside its own weights.
    models = project / "models-x"
    published = json.loads((models / "run.json").read_text())
    assert published["run_id"] == race.first_run
    assert sha256(models / "model.safetensors") == published["weights_sha256"] == shas[race.first_run]
    assert sha256(models / "model.json") == published["spec_sha256"]
    assert "the last to finish wins" in race.first_err


def _register_at_the_barrier(uri: str, root: str, run_id: str, name: str, barrier: object, out: object) -> None:
    from cnnpipe.tracking.registry import logged_model_id, register_run_model
    from cnnpipe.tracking.runs import connect

    client, _ = connect(uri, Path(root))  # the stores opened (and cached) before the start line, not after
    logged_model_id(client, run_id)
    client.search_registered_models()
    barrier.wait(timeout=120)  # type: ignore[attr-defined]
    reg = register_run_model(uri, Path(root), run_id, name, {"acc": 0.5}, "acc", "max")
    out.put(reg.version if reg else None)  # type: ignore[attr-defined]


def test_two_evaluations_at_once_register_the_run_once(
    project: Path, race: Race, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #11 item 3. End to end: two `pipelines/evaluate.py` at once on the published model -> one version.
    Their timing rarely lines the two registrations up, so the race itself comes second, forced: three processes
    call `register_run_model` for the other run at the same instant (a barrier), on the same SQLite store."""
    assert race.returncodes == (0, 0)
    client = MlflowClient(race.uri)
    name = "cnnpipe-eval-race"
    common = (f"tracking.uri={race.uri}", "paths.models=models-x", f"tracking.registered_model={name}")
    procs = [start_stage_process(project, "evaluate", *common, f"paths.eval=eval-x{i}") for i in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    versions = client.search_model_versions(f"name = '{name}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", race.first_run)]
    aliases = client.get_registered_model(name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "1", "champion": "1"}

    (other_run,) = [r.info.run_id for r in stage_runs(client) if r.info.run_id != race.first_run]
    name = "cnnpipe-barrier-race"
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    racers = [
        ctx.Process(target=_register_at_the_barrier, args=(race.uri, str(project), other_run, name, barrier, out))
        for _ in range(3)
    ]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children inherit it: the machine has 2 cores
    for p in racers:
        p.start()
    for p in racers:
        p.join(timeout=300)
    assert [p.exitcode for p in racers] == [0, 0, 0]
    answers = sorted(str(out.get(timeout=5)) for _ in racers)
    versions = client.search_model_versions(f"name = '{name}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", other_run)]
    assert answers == ["1", "1", "1"]
