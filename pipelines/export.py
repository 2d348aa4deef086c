"""Export a model for apps: ONNX taking uint8 images (N, C, H, W), with preprocessing.json beside it.

Usage: python pipelines/export.py [--model SOURCE] [--out DIR] [--images FOLDER] [--tolerance T]
SOURCE: models:/NAME@ALIAS (default: models:/cnnpipe-<data.name>@champion), models:/NAME/VERSION, runs:/RUN/model,
a train run id, or a local models folder (models/), as predict.py takes them. Not a DVC stage.
DIR: default export/<registered name>-v<version> in the project (git ignores export/), replaced by a re-run.
Checked before anything is kept: onnxruntime against PyTorch on the test split (data/prepared/test.npz) when its
images fit the model, else on --images FOLDER; the files are then logged to the model's train run (artifacts onnx/).
"""

import argparse
import sys
from pathlib import Path

from cnnpipe.serving.export import DEFAULT_TOLERANCE, run_export
from cnnpipe.stages.runner import tool_command

PROG = "cnnpipe export"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None, help="model URI, train run id, or models folder (default: champion)")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder to write (default: export/<name>-v<version> in the project)"
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder of images to check the export on (default: the project's test split)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="max |probability difference| allowed between onnxruntime and PyTorch (default: %(default)g)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.tolerance < 1:
        parser.error(f"--tolerance must be in (0, 1), got {args.tolerance}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tool_command(PROG, __file__) as root:
        out = args.out.expanduser() if args.out is not None else None
        images = args.images.expanduser() if args.images is not None else None
        run_export(args.model, out, images, root, args.tolerance)


if __name__ == "__main__":
    main(sys.argv[1:])
