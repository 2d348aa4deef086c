"""The evaluation report (issues #17, #13): eval/report.html, self-contained, for MLflow's artifact viewer, with
every picture of eval/ embedded; eval/report.md linking the same pictures.

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
import torch

from cnnpipe.data.store import Split, save_split
from cnnpipe.evaluation.report import SUMMARY_NAMES, html_text
from tests.helpers import CHROMIUM_FLAGS, ROOT, tiny_model

HOSTILE = '<b>&"x'
CLASSES = ("cat", HOSTILE, "café", "a|b")
# The pictures the report shows, in its order: the network of tiny_model has feature maps, so CAMs are drawn.
PICTURES = ("confusion.png", "errors.png", "confused.png", "calibration.png", "cam/cam.png")


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
    n = len(metrics)
    assert page.rows[0] == ["metric", "value"]
    assert page.rows[1 : n + 1] == [[SUMMARY_NAMES[k], f"{v:.4f}"] for k, v in metrics.items()]
    assert page.rows[n + 1] == ["class", "precision", "recall", "F1", "support"]
    assert [r[0] for r in page.rows[n + 2 :]] == list(CLASSES)  # the true names, one row each
    assert (
        HOSTILE not in text
        and html_text(HOSTILE) == "&lt;b&gt;&amp;&quot;x"
        and f"<td>{html_text(HOSTILE)}</td>" in text
    )
    assert '<meta charset="utf-8">' in text  # MLflow shows it from a Blob with no charset: café must stay café

    # The pictures are the PNGs the stage wrote, each embedded, in the report's order: the page names no other file.
    assert len(page.refs) == len(PICTURES)
    for (tag, attr, src), name in zip(page.refs, PICTURES, strict=True):
        assert (tag, attr) == ("img", "src") and src.startswith("data:image/png;base64,")
        assert (
            base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
            == (evaluated / name).read_bytes()
        ), name
    assert not re.search(r"url\(|@import|<link|<script|<iframe|<object", text, re.I)


def test_markdown_and_html_say_the_same(evaluated: Path) -> None:
    """One content, two renderings: every number row of report.md is a row of report.html."""
    md = (evaluated / "report.md").read_text(encoding="utf-8")
    md_rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md.splitlines() if line[:1] == "|"]
    md_numbers = [row[1:] for row in md_rows if row[0] != "---"]
    page = Cells()
    page.feed((evaluated / "report.html").read_text(encoding="utf-8"))
    assert md_numbers == [row[1:] for row in page.rows]
    assert "![confusion matrix](confusion.png)" in md  # report.md keeps its links for git hosts and editors
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links == list(PICTURES) and all((evaluated / link).is_file() for link in links)


def test_a_method_that_does_not_apply_is_a_sentence_not_a_broken_link() -> None:
    """No class-activation maps (a ViT, say): report.md says why in their section and links no cam.png; report.html
    embeds the other pictures only."""
    from cnnpipe.evaluation.metrics import classification_metrics
    from cnnpipe.evaluation.report import render_html, render_markdown, report_content

    labels = torch.tensor([0, 1, 1])
    m = classification_metrics(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), labels)
    reason = "class-activation maps need a convolutional feature map: vit_tiny's last features are tokens `x`"
    report = report_content(m, ["a", "b"], 3, None, "vit", cam_reason=reason)
    md = render_markdown(report)
    assert "cam.png" not in md and "Not drawn: class\\-activation maps need a convolutional feature map" in md
    assert "\\`x\\`" in md  # the reason is data, escaped: its backticks show as themselves
    page = Cells()
    page.feed(render_html(report, {p.file: p.file.encode() for p in report.pictures if p.file}))
    assert len(page.refs) == len(PICTURES) - 1
    assert html_text(reason) in render_html(report, {p.file: b"" for p in report.pictures if p.file})


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
  classes: [...document.querySelectorAll("tr")].slice(FIRST_CLASS_ROW).map(r => r.cells[0].textContent)}, "*"));
</script>"""


def test_chromium_shows_the_embedded_picture_as_mlflow_frames_it(
    evaluated: Path, chromium: str, tmp_path: Path
) -> None:
    from PIL import Image

    first_class_row = len(json.loads((evaluated / "metrics.json").read_text())["test"]) + 2  # after both headers
    probe = PROBE.replace("FIRST_CLASS_ROW", str(first_class_row))
    report = (evaluated / "report.html").read_text(encoding="utf-8").replace("</body>", probe + "</body>")
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
    sizes = []
    for name in PICTURES:
        with Image.open(evaluated / name) as png:
            sizes.append([True, png.width, png.height])
    assert seen["images"] == sizes
    assert seen["classes"] == list(CLASSES)
