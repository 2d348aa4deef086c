"""`dvc plots show` / `dvc plots diff` whose page renders with no network (Vega inlined, no CDN).

Usage: python pipelines/plots.py [show|diff] [dvc plots options and targets...]
The first word picks the command (default: show); the rest goes to DVC as is, plus `--html-template
.dvc/plots-offline.html` (written first when missing or stale: cnnpipe.offline_plots) and `-o dvc_plots` unless
you give -o. Prints the path of the index.html to open. Works in any DVC repo: the one holding the cwd.
Examples: python pipelines/plots.py;  python pipelines/plots.py diff HEAD~1;  python pipelines/plots.py --open
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from cnnpipe.errors import CnnpipeError
from cnnpipe.offline_plots import ensure_template, find_dvc_root
from cnnpipe.stages.runner import EXIT_INTERRUPTED, EXIT_USER_ERROR

PROG = "cnnpipe plots"
COMMANDS = ("show", "diff")
DEFAULT_OUT = "dvc_plots"


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    return "show", argv


def known_options(args: list[str]) -> argparse.Namespace:
    """The options of `dvc plots show/diff` this wrapper acts on; everything else is DVC's alone."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-o", "--out")
    parser.add_argument("--html-template")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show-vega", action="store_true")
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(args)[0]


def dvc_command(command: str, args: list[str], template: Path | None, out: str | None) -> list[str]:
    extra = [] if template is None else ["--html-template", str(template)]
    extra += [] if out is None else ["-o", out]
    return [sys.executable, "-m", "dvc", "plots", command, *args, *extra]


def run(command: str, args: list[str], opts: argparse.Namespace) -> int:
    template = None
    if opts.html_template is None:  # a template of the user's wins
        template, written = ensure_template(find_dvc_root())
        if written:
            print(f"[plots] wrote {template} ({template.stat().st_size // 1024} KiB)", file=sys.stderr)
    index = (Path.cwd() / (opts.out or DEFAULT_OUT)).resolve() / "index.html"  # where DVC writes it
    started = time.time()
    # DVC's own stdout is its page's file:// URI; the one line printed here replaces it.
    cmd = dvc_command(command, args, template, None if opts.out else DEFAULT_OUT)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.strip() != index.as_uri():
            print(line)
    if proc.returncode != 0:
        return proc.returncode
    if index.is_file() and index.stat().st_mtime >= started - 1:
        print(index)
    else:
        print(f"[plots] no page written ({index} not updated)", file=sys.stderr)
    return 0


def main(argv: list[str]) -> int:
    command, args = split_command(argv)
    opts = known_options(args)
    if opts.help:
        print(__doc__)
        return subprocess.run([sys.executable, "-m", "dvc", "plots", command, "--help"]).returncode
    if opts.json or opts.show_vega:  # no page is written: DVC's output as is
        return subprocess.run(dvc_command(command, args, None, None)).returncode
    try:
        return run(command, args, opts)
    except CnnpipeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
