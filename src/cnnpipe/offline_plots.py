"""An HTML template for `dvc plots show/diff` that renders with no network.

DVC's plot page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline only the PNG plots show. DVC takes a
page template (`--html-template`, config `plots.html_template`): it requires `{plot_divs}`, and injects its CDN
<script> tags only where the template has `{scripts}`. This template leaves `{scripts}` out and inlines the three
libraries instead, from vl-convert-python's `javascript_bundle()` (the Vega project's own offline bundle, shipped in
a wheel, so nothing is fetched from a CDN or committed by hand).

Building the bundle takes seconds, so the template is written once to `.dvc/plots-offline.html` (git-ignored) and
rewritten only when its stamp (library versions, page layout) no longer matches.

Usage: python -m cnnpipe.offline_plots [--root DVC_REPO] [--force]   (prints the template's path)
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from importlib.metadata import version
from pathlib import Path

from cnnpipe.atomic import write_text_atomic
from cnnpipe.errors import CnnpipeError

TEMPLATE_NAME = "plots-offline.html"  # in the DVC folder: `plots.html_template` paths are relative to .dvc/

# DVC's page (dvc_render.html.PAGE_HTML) with the CDN scripts replaced by the inlined bundle and a charset (the
# bundle holds a few non-ASCII characters). No `{scripts}`: DVC would put its CDN <script> tags there.
_HEAD = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>
"""
_TAIL = """
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
# The bundle is an ES module's code meant for a classic <script> (the plot divs call `vegaEmbed` inline while the
# page is parsed, before any module script would run). The function scope keeps its top-level names (`t`, `n`, ...)
# off the page's globals, where a `const` could clash with the plots' `var spec`; it sets window.vegaEmbed itself.
_WRAP_OPEN = '(function () {\n"use strict";\n'
_WRAP_CLOSE = "\n})();"
_LAYOUT = hashlib.sha256((_HEAD + _WRAP_OPEN + _WRAP_CLOSE + _TAIL).encode()).hexdigest()[:12]

# Text that must not occur in the inlined JavaScript: DVC substitutes its placeholders anywhere in the template
# (plain str.replace), and `</script` or `<!--` would end or confuse the <script> element.
_UNSAFE = ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script", "<!--")


class OfflinePlotsError(CnnpipeError):
    """The offline template cannot be built from the installed packages."""


def template_path(repo_root: Path) -> Path:
    return repo_root / ".dvc" / TEMPLATE_NAME


def find_dvc_root(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` holding `.dvc/`, as DVC finds its repo."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise OfflinePlotsError(f"no DVC repository (.dvc/) at or above {here}")


def vega_lite_version() -> str:
    """The newest Vega-Lite that vl-convert bundles with the major version of DVC's templates' `$schema`
    (v5 in dvc-render 1.x): specs run on the Vega-Lite they were written for, and vega-embed has no
    version mismatch to warn about."""
    import vl_convert
    from dvc_render.vega_templates import LinearTemplate

    schema = str(LinearTemplate.DEFAULT_CONTENT["$schema"])
    match = re.search(r"/vega-lite/v(\d+)(?:\.[\d.]+)?\.json$", schema)
    if match is None:
        raise OfflinePlotsError(f"dvc-render's template $schema {schema!r} names no Vega-Lite version")
    major = match.group(1)
    bundled = [v.lstrip("v") for v in vl_convert.get_vegalite_versions()]
    same_major = [v for v in bundled if v.split(".")[0] == major]
    if not same_major:
        raise OfflinePlotsError(
            f"vl-convert-python {version('vl-convert-python')} bundles Vega-Lite {', '.join(bundled)}, none v{major} "
            f"as DVC's plot templates need; install a vl-convert-python that does"
        )
    return max(same_major, key=lambda v: tuple(int(p) for p in v.split(".")))


def stamp() -> str:
    """What the template was built from; a template with another stamp is stale."""
    import vl_convert

    return (
        f"cnnpipe offline plots: vl-convert-python {version('vl-convert-python')}, Vega-Lite {vega_lite_version()}, "
        f"Vega {vl_convert.get_vega_version()}, vega-embed {vl_convert.get_vega_embed_version()}, layout {_LAYOUT}"
    )


def _stamp_line(text: str) -> str:
    return f"<!-- {text} -->\n"


def render_template() -> str:
    """The whole template: DVC's placeholders, the stamp, and the bundle inlined in one classic <script>."""
    import vl_convert

    # The stub types `snippet` as required; the binding defaults it to none (the libraries alone).
    bundle = vl_convert.javascript_bundle(vl_version=vega_lite_version())  # type: ignore[call-arg]
    found = [s for s in _UNSAFE if s in bundle]
    if found:
        raise OfflinePlotsError(f"the vl-convert JavaScript bundle contains {found}, which cannot be inlined as is")
    head = _HEAD.replace("<html>", _stamp_line(stamp()) + "<html>", 1)
    return head + _WRAP_OPEN + bundle + _WRAP_CLOSE + _TAIL


def is_current(path: Path) -> bool:
    """The template exists, was built from the installed versions, and was written whole (atomic write)."""
    if not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:
        head = f.read(2048)
    return _stamp_line(stamp()) in head


def ensure_template(repo_root: Path, force: bool = False) -> tuple[Path, bool]:
    """(template path, whether it was (re)written now)."""
    path = template_path(repo_root)
    if not force and is_current(path):
        return path, False
    write_text_atomic(path, render_template())
    return path, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnnpipe.offline_plots", description="Write the offline page template for `dvc plots show/diff`."
    )
    parser.add_argument("--root", type=Path, default=None, help="DVC repository (default: the one holding the cwd)")
    parser.add_argument("--force", action="store_true", help="rewrite the template even when it is current")
    args = parser.parse_args(argv)
    try:
        root = find_dvc_root(args.root)
        path, written = ensure_template(root, force=args.force)
    except CnnpipeError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if written:
        print(f"[plots] wrote the offline plot template ({path.stat().st_size // 1024} KiB)", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
