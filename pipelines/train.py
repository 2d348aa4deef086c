"""DVC stage `train`: fit the CNN, save models/, log the run to MLflow.

Usage: python pipelines/train.py [overrides...]   e.g.  optim.lr=0.01 model=cnn_bn train.epochs=20
"""

import sys

from cnnpipe.config import explicit_keys
from cnnpipe.stages.runner import run_stage
from cnnpipe.stages.train import run_training

if __name__ == "__main__":
    # Keys the user set (here, or in params.yaml apart from conf/) win over the sweep's best values.
    run_stage("train", lambda cfg, root: run_training(cfg, root, explicit_keys(sys.argv[1:], root)))
