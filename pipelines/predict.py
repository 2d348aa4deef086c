"""Predict a folder of images -> a CSV (file, class, probability, error).

Usage: python pipelines/predict.py IMAGES [--model SOURCE] [--out CSV] [--log DEST | --no-log] [--log-images DIR]
SOURCE: models:/NAME@ALIAS (default: models:/cnnpipe-<data.name>@champion), models:/NAME/VERSION, runs:/RUN/model,
a train run id, or a local models folder (models/). Not a DVC stage: a tool for the model the pipeline made.
CSV: default predictions/<IMAGES folder name>.csv in the project (git ignores predictions/), replaced by a re-run.
DEST: the prediction log pipelines/monitor.py reads, appended to: default monitor/predictions.jsonl in the project
(git ignores monitor/); a file, or a database URL (postgresql://..., sqlite:///...). Images are kept only with
--log-images.
"""

import argparse
import sys
from pathlib import Path

from cnnpipe.monitoring.prediction_log import DEFAULT_LOG
from cnnpipe.serving.predict import run_predict
from cnnpipe.stages.runner import tool_command

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
    parser.add_argument(
        "--log",
        default=None,
        help="prediction log to append to: a file or a database URL (default: monitor/predictions.jsonl)",
    )
    parser.add_argument("--no-log", action="store_true", help="append nothing to a prediction log")
    parser.add_argument(
        "--log-images", type=Path, default=None, help="also keep each image (as the model saw it) in this folder"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.no_log and (args.log is not None or args.log_images is not None):
        parser.error("--no-log cannot be given with --log or --log-images")
    if args.log is not None and not args.log.strip():
        parser.error("--log needs a file or a database URL (or give --no-log)")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tool_command(PROG, __file__) as root:
        out = args.out.expanduser() if args.out is not None else None  # None: default_out, under the project
        log = None if args.no_log else args.log or str((root if root is not None else Path()) / DEFAULT_LOG)
        if log is not None and "://" not in log:
            log = str(Path(log).expanduser())
        images = args.log_images.expanduser() if args.log_images is not None else None
        run_predict(args.images.expanduser(), out, args.model, root, args.batch_size, log, images)


if __name__ == "__main__":
    main(sys.argv[1:])
