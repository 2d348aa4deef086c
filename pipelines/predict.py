"""Predict a folder of images -> a CSV (file, class, probability, error).

Usage: python pipelines/predict.py IMAGES [--model SOURCE] [--out CSV]
SOURCE: models:/NAME@ALIAS (default: models:/cnnpipe-<data.name>@champion), models:/NAME/VERSION, runs:/RUN/model,
a train run id, or a local models folder (models/). Not a DVC stage: a tool for the model the pipeline made.
CSV: default predictions/<IMAGES folder name>.csv in the project (git ignores predictions/), replaced by a re-run.
"""

import argparse
import os
import sys
from pathlib import Path

from cnnpipe.config import find_project_root
from cnnpipe.errors import CnnpipeError
from cnnpipe.serving.predict import run_predict
from cnnpipe.stages.runner import command_errors

PROG = "cnnpipe predict"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("images", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--model", default=None, help="model URI, train run id, or models folder (default: champion)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV to write (default: predictions/<IMAGES folder name>.csv in the project)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars on the terminal
    with command_errors(PROG):
        try:
            root: Path | None = find_project_root(Path(__file__).resolve().parent)
        except CnnpipeError:
            root = None  # a copied script: a local models folder still works
        out = args.out.expanduser() if args.out is not None else None  # None: default_out, under the project
        run_predict(args.images.expanduser(), out, args.model, root, args.batch_size)


if __name__ == "__main__":
    main(sys.argv[1:])
