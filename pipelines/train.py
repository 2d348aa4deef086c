"""DVC stage `train`: fit the CNN, save models/, log the run to MLflow.

Usage: python pipelines/train.py [overrides...]   e.g.  optim.lr=0.01 model=cnn_bn train.epochs=20
"""

from cnnpipe.stage import run_stage
from cnnpipe.training.run_training import run_training

if __name__ == "__main__":
    run_stage("train", run_training)
