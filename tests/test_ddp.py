"""Real DDP on CPU: 2 processes with the gloo backend (Lightning's launcher re-runs the script per rank)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import prepared_copy, stage_env

pytestmark = pytest.mark.slow

COMMON = ["augment=none", "train.hparams=params", "trainer.accelerator=cpu", "train.epochs=5", "optim.lr=0.003"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One single-process and one 2-process DDP training, same global batch (64 = 2 x 32) and steps."""
    root = prepared_copy(tmp_path_factory.mktemp("ddp"))
    uri = f"tracking.uri=sqlite:///{root / 'mlflow.db'}"
    run(
        [
            sys.executable,
            "pipelines/train.py",
            *COMMON,
            uri,
            "data.batch_size=64",
            "paths.models=models-single",
            "paths.eval=eval-single",
        ],
        root,
    )
    run(
        [
            sys.executable,
            "pipelines/train.py",
            *COMMON,
            uri,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "data.batch_size=32",
            "paths.models=models-ddp",
            "paths.eval=eval-ddp",
        ],
        root,
    )
    from cnnpipe.config import load_config
    from cnnpipe.stages.evaluate import run_evaluation

    for kind in ("single", "ddp"):  # in-process: evaluation is not what is tested here
        cfg = load_config([*COMMON, uri, f"paths.models=models-{kind}", f"paths.eval=eval-{kind}"], root=root)
        run_evaluation(cfg, root)
    return root


def test_ddp_run_is_one_mlflow_run_with_one_model(trained: Path) -> None:
    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cnnpipe-digits")
    runs = client.search_runs([exp.experiment_id], filter_string="params.`trainer.strategy` = 'ddp'")
    assert len(runs) == 1  # rank 1 opened no run
    run_id = json.loads((trained / "models-ddp" / "run.json").read_text())["run_id"]
    assert runs[0].info.run_id == run_id and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["trainer.devices"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1, 2, 3, 4, 5]
    assert not any((trained / "checkpoints").rglob("*.ckpt"))  # one checkpoint folder, cleaned after success


def test_ddp_reaches_the_single_process_accuracy_band(trained: Path) -> None:
    single = json.loads((trained / "eval-single" / "metrics.json").read_text())["test"]["acc"]
    ddp = json.loads((trained / "eval-ddp" / "metrics.json").read_text())["test"]["acc"]
    assert single > 0.85 and ddp > 0.85
    assert abs(single - ddp) < 0.06


def test_ddp_validation_metrics_equal_single_process_for_the_same_weights(trained: Path, tmp_path: Path) -> None:
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"val-{devices}.json"
        run(
            [
                sys.executable,
                str(Path(__file__).parent / "ddp_validate.py"),
                "--models",
                str(trained / "models-ddp"),
                "--prepared",
                str(trained / "data" / "prepared"),
                "--devices",
                str(devices),
                "--out",
                str(out),
            ],
            trained,
        )
        results[devices] = json.loads(out.read_text())
    # 179 val images split unevenly over 2 ranks, no padding: torchmetrics' sync gives the exact same numbers.
    assert results[2]["val/acc"] == pytest.approx(results[1]["val/acc"], abs=1e-6)
    assert results[2]["val/f1_macro"] == pytest.approx(results[1]["val/f1_macro"], abs=1e-6)
    assert results[2]["val/loss"] == pytest.approx(results[1]["val/loss"], rel=0.02)


def test_several_steps_per_call_under_ddp_take_the_same_steps(tmp_path: Path) -> None:
    """Under DDP each of the steps in one Lightning iteration is all-reduced: rank 0 ends with the weights and
    metrics of one step per iteration."""
    import torch

    out = tmp_path / "steps.pt"
    run([sys.executable, str(Path(__file__).parent / "ddp_steps.py"), "--per-call", "4", "--out", str(out)], tmp_path)
    one, four = torch.load(out, weights_only=False).values()
    assert one["world_size"] == four["world_size"] == 2
    assert one["global_step"] == four["global_step"] == 3 * 5  # 35 samples per rank, batch 8
    assert (one["iterations"], four["iterations"]) == (5, 2)
    assert one["weights"].keys() == four["weights"].keys()
    assert all(torch.equal(one["weights"][k], four["weights"][k]) for k in one["weights"])
    assert one["history"] == four["history"]


def test_a_frozen_then_unfrozen_backbone_stays_in_sync_across_ranks(tmp_path: Path) -> None:
    """Fine-tuning under DDP (timm network, backbone frozen for epoch 1, weight EMA on): after the unfreeze both
    ranks train one backbone — their weights and averages are identical — and it moved away from the pretrained
    file. The freeze must come after DDP wraps the model, or DDP never synchronises the backbone (each rank then
    trains its own), and the EMA copy must not ask DDP for gradients."""
    import timm
    import torch

    torch.manual_seed(5)
    pretrained = timm.create_model("test_resnet.r160_in1k").state_dict()
    torch.save(pretrained, tmp_path / "weights.pth")
    script = Path(__file__).parent / "ddp_finetune.py"
    run([sys.executable, str(script), "--weights", str(tmp_path / "weights.pth"), "--out", str(tmp_path)], tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["strategy_kwargs"].get("find_unused_parameters") is True
    for kind in ("raw", "ema"):
        a, b = ranks[0][kind], ranks[1][kind]
        # parameters (BatchNorm's running statistics are each rank's own since its last forward: DDP broadcasts
        # rank 0's at the start of every forward)
        differ = [k for k in a if "running_" not in k and "num_batches" not in k and not torch.equal(a[k], b[k])]
        assert differ == [], f"{kind} weights differ between ranks: {differ[:3]}"
    conv = "net.conv1.0.weight"
    assert not torch.equal(ranks[0]["raw"][conv], pretrained["conv1.0.weight"])  # the backbone trained after epoch 1
    assert not torch.equal(ranks[0]["raw"][conv], ranks[0]["ema"][conv])  # the average is not the raw weights
