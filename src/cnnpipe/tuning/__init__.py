"""Optuna sweeps driven directly (no Hydra sweeper plugin): space, storage, objective, workers, report."""
