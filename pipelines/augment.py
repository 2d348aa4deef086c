"""DVC stage `augment`: the train split plus `augment.copies` seeded augmented copies.

Usage: python pipelines/augment.py [overrides...]   e.g.  augment.copies=8  or  augment=none
"""

from cnnpipe.stages.augment import write_augmented
from cnnpipe.stages.runner import run_stage

if __name__ == "__main__":
    run_stage("augment", write_augmented)
