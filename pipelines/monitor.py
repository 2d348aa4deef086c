"""Compare what a model served (its prediction log) with what it saw at training time (its reference): drift.

Usage: python pipelines/monitor.py [--model SOURCE] [--log DEST] [--last N] [--since TIME] [--alpha A] [--out DIR]
SOURCE: as predict.py takes it (default: the champion); its training reference (reference.npz) travels with it.
DEST: the prediction log predict.py or a served model wrote (default: monitor/predictions.jsonl in the project);
a file, or a database URL (postgresql://..., sqlite:///...).
The window: the model's last N records (default 500), or all those since TIME (ISO 8601; UTC unless it says), or
the last N of those since TIME.
Output: a report (report.md + pictures) in DIR (default monitor/reports/<UTC time>/), an MLflow run in the model's
experiment, and the exit code: 0 no drift, 1 drift (so that a scheduler can act), 2 a usage or data error (one
line), 3 the monitor itself failed (a traceback): never 1, so that a crash is not taken for drift.
"""

import argparse
import sys
from pathlib import Path

from cnnpipe.errors import DataError
from cnnpipe.monitoring.prediction_log import log_time
from cnnpipe.serving.monitor import DEFAULT_ALPHA, DEFAULT_WINDOW, run_monitor
from cnnpipe.stages.runner import tool_command

PROG = "cnnpipe monitor"
EXIT_DRIFT = 1
EXIT_FAILED = 3


def _since(text: str) -> str:
    try:
        return log_time(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None, help="model URI, train run id, or models folder (default: champion)")
    parser.add_argument("--log", default=None, help="prediction log: a file or a database URL")
    parser.add_argument(
        "--last",
        type=int,
        default=None,
        help=f"window: the last N records (default {DEFAULT_WINDOW}; all with --since)",
    )
    parser.add_argument("--since", type=_since, default=None, help="window: records at or after this time (UTC)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="false-alarm rate per window, all tests together (Bonferroni; default %(default)g)",
    )
    parser.add_argument("--out", type=Path, default=None, help="report folder to create (default: monitor/reports/…)")
    args = parser.parse_args(argv)
    if args.last is not None and args.last < 1:
        parser.error(f"--last must be >= 1, got {args.last}")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    last = args.last if args.last is not None else (None if args.since else DEFAULT_WINDOW)
    try:
        with tool_command(PROG, __file__) as root:
            out = args.out.expanduser() if args.out is not None else None
            report = run_monitor(args.model, args.log, root, last, args.since, out, args.alpha)
    except Exception:  # a bug, or a failure nobody foresaw: its (masked) traceback, and exit 3, not 1 (drift)
        sys.excepthook(*sys.exc_info())
        sys.exit(EXIT_FAILED)
    if report.result.drift:
        sys.exit(EXIT_DRIFT)


if __name__ == "__main__":
    main(sys.argv[1:])
