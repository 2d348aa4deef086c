"""Compare what a model served (its prediction log) with what it saw at training time (its reference): drift.

Usage: python pipelines/monitor.py [--model SOURCE] [--log DEST] [--last N] [--since TIME] [--alpha A] [--out DIR]
SOURCE: as predict.py takes it (default: the champion); its training reference (reference.npz) travels with it.
DEST: the prediction log predict.py or a served model wrote (default: monitor/predictions.jsonl in the project);
a file, or a database URL (postgresql://..., sqlite:///...).
The window: the model's last N records (default 500), or those since TIME (ISO 8601, UTC).
Output: a report (report.md + pictures) in DIR (default monitor/reports/<UTC time>/), an MLflow run in the model's
experiment, and the exit code: 0 no drift, 1 drift (so that a scheduler can act), 2 a usage or data error.
"""

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from cnnpipe.serving.monitor import DEFAULT_ALPHA, DEFAULT_WINDOW, run_monitor
from cnnpipe.stages.runner import tool_command

PROG = "cnnpipe monitor"
EXIT_DRIFT = 1


def _since(text: str) -> str:
    """An ISO 8601 time as the log writes it (UTC, milliseconds), so that string order is time order."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-12-07T09:00)") from None
    when = when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    return when.isoformat(timespec="milliseconds")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None, help="model URI, train run id, or models folder (default: champion)")
    parser.add_argument("--log", default=None, help="prediction log: a file or a database URL")
    parser.add_argument("--last", type=int, default=DEFAULT_WINDOW, help="window: the last N records (%(default)s)")
    parser.add_argument("--since", type=_since, default=None, help="window: records at or after this time (UTC)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="false-alarm rate per window, all tests together (Bonferroni; default %(default)g)",
    )
    parser.add_argument("--out", type=Path, default=None, help="report folder to create (default: monitor/reports/…)")
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error(f"--last must be >= 1, got {args.last}")
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must be in (0, 1), got {args.alpha}")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tool_command(PROG, __file__) as root:
        out = args.out.expanduser() if args.out is not None else None
        report = run_monitor(args.model, args.log, root, args.last, args.since, out, args.alpha)
    if report.result.drift:
        sys.exit(EXIT_DRIFT)


if __name__ == "__main__":
    main(sys.argv[1:])
