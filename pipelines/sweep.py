"""DVC stage `sweep`: an Optuna study over `sweep.space` on train/val; writes sweep/best_params.yaml.

Usage: python pipelines/sweep.py [overrides...]   e.g.  sweep.n_trials=30 sweep.workers=2
Re-running the same config resumes its study up to sweep.n_trials in total.
"""

from cnnpipe.stage import run_stage
from cnnpipe.tuning.run_sweep import run_sweep

if __name__ == "__main__":
    run_stage("sweep", run_sweep)
