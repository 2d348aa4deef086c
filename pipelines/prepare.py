"""DVC stage `prepare`: decode the source named by `data.*`, split, write data/prepared/.

Usage: python pipelines/prepare.py [overrides...]   e.g.  data=imagefolder data.path=~/images
"""

from cnnpipe.stages.prepare import prepare_splits
from cnnpipe.stages.runner import run_stage

if __name__ == "__main__":
    run_stage("prepare", lambda cfg, root: prepare_splits(cfg, root / cfg.paths.prepared))
