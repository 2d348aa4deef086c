"""The search space from `sweep.space`: any config key, with a float / int / categorical distribution."""

from __future__ import annotations

from typing import Any

import optuna

from cnnpipe.config import ParamSpace


def suggest(trial: optuna.Trial, space: dict[str, ParamSpace]) -> dict[str, Any]:
    """Config key -> value for one trial. Optuna's param names are the config keys, so they line up
    with the flattened MLflow params."""
    values: dict[str, Any] = {}
    for p in space.values():
        if p.type == "categorical":
            values[p.key] = trial.suggest_categorical(p.key, list(p.choices or []))
        elif p.type == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)  # type: ignore[arg-type]
        else:
            values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)  # type: ignore[arg-type]
    return values


def epoch_range(space: dict[str, ParamSpace], default_epochs: int) -> tuple[int, int]:
    """(min, max) epochs a trial may run: Hyperband's resource range."""
    for p in space.values():
        if p.key == "train.epochs":
            if p.type == "categorical":
                return int(min(p.choices or [default_epochs])), int(max(p.choices or [default_epochs]))
            return int(p.low), int(p.high)  # type: ignore[arg-type]
    return default_epochs, default_epochs


def distributions(space: dict[str, ParamSpace]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Config key -> the Optuna distribution `suggest` draws it from (for samplers that see the whole space)."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for p in space.values():
        if p.type == "categorical":
            out[p.key] = optuna.distributions.CategoricalDistribution(list(p.choices or []))
        elif p.type == "int":
            out[p.key] = optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))  # type: ignore[arg-type]
        else:
            out[p.key] = optuna.distributions.FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)  # type: ignore[arg-type]
    return out
