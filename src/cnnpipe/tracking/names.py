"""What experiments and runs are called. The MLflow UI's run-name column shows about 16 characters, so a run's
name is its stage and what tells it apart: the DVC experiment's name, else the start time to the minute (the
Created column has the seconds; the model and every setting are columns of their own)."""

from __future__ import annotations

import os
import time

from cnnpipe.config import Config

DVC_EXP_NAME = "DVC_EXP_NAME"  # set by `dvc exp run` for every stage command of an experiment
DVC_EXP_BASELINE_REV = "DVC_EXP_BASELINE_REV"


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"cnnpipe-{cfg.data.name}"


def dvc_experiment() -> str | None:
    """The DVC experiment this stage runs in (`dvc exp run`), or None (`dvc repro`, a stage run by hand)."""
    return os.environ.get(DVC_EXP_NAME) or None


def run_label() -> str:
    """`<dvc experiment>` or the local start time `MMDD-HHMM`."""
    return dvc_experiment() or time.strftime("%m%d-%H%M")


def dvc_tags() -> dict[str, str]:
    """Tags linking a run to its DVC experiment (`dvc exp show` names the same experiment)."""
    name = dvc_experiment()
    if not name:
        return {}
    tags = {"cnnpipe.dvc_exp": name}
    if os.environ.get(DVC_EXP_BASELINE_REV):
        tags["cnnpipe.dvc_baseline_rev"] = os.environ[DVC_EXP_BASELINE_REV]
    return tags
