"""Sweep outputs: trials.csv, best_params.yaml and Optuna's pictures."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cnnpipe.figures import plt, save_png
from cnnpipe.tuning.objective import RUN_ID_ATTR

STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    keys = sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {
            "number": t.number,
            "state": STATE_NAMES.get(t.state, t.state.name.lower()),
            "value": "" if t.value is None else round(t.value, 6),
            "epochs": len(t.intermediate_values),
            "duration_s": "" if t.duration is None else round(t.duration.total_seconds(), 2),
            "retry_of": t.system_attrs.get("failed_trial", ""),
            "mlflow_run_id": t.user_attrs.get(RUN_ID_ATTR, ""),
        }
        row.update({f"params.{k}": t.params.get(k, "") for k in keys})
        rows.append(row)
    return rows


def trials_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    out = {name: sum(1 for t in trials if t.state == s) for s, name in STATE_NAMES.items()}
    out["total"] = len(trials)
    return out


def _save_plot(draw: Any, study: optuna.Study, path: Path, title: str) -> None:
    """Optuna's matplotlib plot, or a figure saying why there is none yet (too few trials)."""
    try:
        with warnings.catch_warnings():
            # optuna.visualization.matplotlib is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = draw(study)
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: not available yet\n({exc})", ha="center", va="center", wrap=True)
    save_png(fig, path, dpi=100)
    plt.close("all")  # and any figure a failed `draw` left behind


def write_plots(study: optuna.Study, folder: Path) -> None:
    from optuna.visualization import matplotlib as ovm

    _save_plot(ovm.plot_optimization_history, study, folder / "history.png", "optimization history")
    _save_plot(ovm.plot_param_importances, study, folder / "importances.png", "parameter importances")
    _save_plot(ovm.plot_parallel_coordinate, study, folder / "parallel.png", "parallel coordinates")
