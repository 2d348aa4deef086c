"""DVC stage `evaluate`: test-split metrics into eval/ and into the train run in MLflow.

Usage: python pipelines/evaluate.py [overrides...]
"""

from cnnpipe.stages.evaluate import run_evaluation
from cnnpipe.stages.runner import run_stage

if __name__ == "__main__":
    run_stage("evaluate", run_evaluation)
