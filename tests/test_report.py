"""The evaluation report (issue #17): eval/report.html, self-contained, for MLflow's artifact viewer.

MLflow 3.17 renders report.md but shows its relative image as link text (and strips `data:` images from
markdown); it shows .html in an iframe (a Blob URL, sandbox="allow-scripts") where a `data:` image displays.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from cnnpipe.data.store import Split, save_split
from cnnpipe.evaluation.report import SUMMARY_NAMES, html_text
from tests.helpers import CHROMIUM_FLAGS, ROOT, tiny_model

HOSTILE = '<b>&"x'
CLASSES = ("cat", HOSTILE, "café", "a|b")


class Cells(HTMLParser):
    """The text of every table row's cells (entities decoded), and every `src`/`href` the page names."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.refs: list[tuple[str, str, str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The evaluate stage in-process on a tiny untrained model and 12 test images (no run.json: no MLflow)."""
    from cnnpipe.config import load_config
    from cnnpipe.stages.evaluate import run_evaluation

    root = tmp_path_factory.mktemp("report")
    tiny_model(root / "models", classes=CLASSES)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 1, 8, 8), dtype=np.uint8)
    (root / "data/prepared").mkdir(parents=True)
    save_split(root / "data/prepared/test.npz", Split(images, np.arange(12, dtype=np.int64) % len(CLASSES)))
    run_evaluation(load_config([], root=ROOT), root)
    return root / "eval"


def test_html_report_has_the_metrics_every_class_escaped_and_the_picture_inside(evaluated: Path) -> None:
    text = (evaluated / "report.html").read_text(encoding="utf-8")
    page = Cells()
    page.feed(text)
    metrics = json.loads((evaluated / "metrics.json").read_text())["test"]
    assert page.rows[0] == ["metric", "value"]
    assert page.rows[1:7] == [[SUMMARY_NAMES[k], f"{v:.4f}"] for k, v in metrics.items()]
    assert page.rows[7] == ["class", "precision", "recall", "F1", "support"]
    assert [r[0] for r in page.rows[8:]] == list(CLASSES)  # the true names, one row each
    assert (
        HOSTILE not in text
        and html_text(HOSTILE) == "&lt;b&gt;&amp;&quot;x"
        and f"<td>{html_text(HOSTILE)}</td>" in text
    )
    assert '<meta charset="utf-8">' in text  # MLflow shows it from a Blob with no charset: café must stay café

    # The picture is the confusion.png the stage wrote, embedded: the page names no other file.
    [(tag, attr, src)] = page.refs
    assert (tag, attr) == ("img", "src") and src.startswith("data:image/png;base64,")
    assert (
        base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        == (evaluated / "confusion.png").read_bytes()
    )
    assert not re.search(r"url\(|@import|<link|<script|<iframe|<object", text, re.I)


def test_markdown_and_html_say_the_same(evaluated: Path) -> None:
    """One content, two renderings: every number row of report.md is a row of report.html."""
    md = (evaluated / "report.md").read_text(encoding="utf-8")
    md_rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md.splitlines() if line[:1] == "|"]
    md_numbers = [row[1:] for row in md_rows if row[0] != "---"]
    page = Cells()
    page.feed((evaluated / "report.html").read_text(encoding="utf-8"))
    assert md_numbers == [row[1:] for row in page.rows]
    assert "![confusion matrix](confusion.png)" in md  # report.md keeps its link for git hosts and editors


# MLflow's ShowArtifactHtmlView: the artifact's text as a Blob (type text/html, no charset) in an iframe with
# sandbox="allow-scripts". Here the report gets a probe script that tells the parent page, which dump-dom prints,
# what its image decoded to and what its class cells read.
HARNESS = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><pre id="out">waiting</pre><script>
addEventListener("message", e => { document.getElementById("out").textContent = JSON.stringify(e.data); });
const frame = document.createElement("iframe");
frame.setAttribute("sandbox", "allow-scripts");
frame.src = URL.createObjectURL(new Blob([REPORT], {type: "text/html"}));
document.body.appendChild(frame);
</script></body></html>"""
PROBE = """<script>addEventListener("load", () => parent.postMessage({
  images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  classes: [...document.querySelectorAll("tr")].slice(8).map(r => r.cells[0].textContent)}, "*"));</script>"""


def test_chromium_shows_the_embedded_picture_as_mlflow_frames_it(
    evaluated: Path, chromium: str, tmp_path: Path
) -> None:
    from PIL import Image

    report = (evaluated / "report.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>")
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS.replace("REPORT", json.dumps(report).replace("</", "<\\/")), encoding="utf-8")
    out, found = b"", None
    for budget in (5000, 30000):  # a busy machine can need more than 5 s of virtual time for the blob frame
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--virtual-time-budget={budget}"]
        proc = subprocess.Popen(
            [*cmd, "--dump-dom", harness.as_uri()],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        found = re.search(r'<pre id="out">(.*?)</pre>', out.decode("utf-8", errors="replace"), re.S)
        if found and found.group(1) != "waiting":
            break
    assert found and found.group(1) != "waiting", out[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    with Image.open(evaluated / "confusion.png") as png:
        assert seen["images"] == [[True, png.width, png.height]]
    assert seen["classes"] == list(CLASSES)
