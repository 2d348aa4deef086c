"""DVC stage `sweep`: an Optuna study over `sweep.space` on train/val; writes sweep/best_params.yaml.

Usage: python pipelines/sweep.py [overrides...]   e.g.  sweep.n_trials=30 sweep.workers=2
Re-running the same config resumes its study up to sweep.n_trials in total.
"""

import sys

from cnnpipe.config import explicit_keys
from cnnpipe.stages.runner import run_stage
from cnnpipe.stages.sweep import run_sweep

if __name__ == "__main__":
    # A tuned key the user set (here, or in params.yaml apart from conf/) is pinned, not searched.
    run_stage("sweep", lambda cfg, root: run_sweep(cfg, root, explicit_keys(sys.argv[1:], root)))
