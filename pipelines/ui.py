"""`make ui`'s first step: point the project's experiment at a saved runs view and print the URL that opens it.

Usage: python pipelines/ui.py [--host 127.0.0.1] [--port 5000] [overrides...]
"""

import argparse
import sys
from pathlib import Path

from cnnpipe.config import Config
from cnnpipe.console import info
from cnnpipe.stages.runner import run_stage
from cnnpipe.tracking.names import experiment_name
from cnnpipe.tracking.ui import prepare_ui

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the MLflow UI's URL of this project's runs.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args, overrides = parser.parse_known_args(sys.argv[1:])
    base = f"http://{args.host}:{args.port}"

    def show(cfg: Config, root: Path) -> None:
        info("ui", f"runs of {experiment_name(cfg)}: {prepare_ui(cfg, root, base)}")
        info("ui", f"registered models: {base}/#/models")

    run_stage("ui", show, overrides)
