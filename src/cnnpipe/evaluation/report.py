"""The human-readable evaluation report: a short table on the terminal, eval/report.md and eval/report.html.

The report's content is built once (`report_content`) and rendered twice. report.md is for the terminal, git and
editors (its relative image links work there); report.html is for MLflow's artifact viewer, which renders
markdown but shows a relative image as its link text and strips `data:` images from markdown, while it shows
HTML in a sandboxed iframe where an image embedded as a `data:` URI displays. So report.html carries every
picture inside itself and needs no other file.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cnnpipe.evaluation.metrics import CALIBRATION_BINS, TOP_K, TestMetrics

SUMMARY_NAMES = {
    "acc": "accuracy",
    "f1_macro": "macro F1",
    "precision_macro": "macro precision",
    "recall_macro": "macro recall",
    "ece": "calibration error (ECE)",
    "loss": "cross-entropy",
    **{f"top{k}_acc": f"top-{k} accuracy" for k in TOP_K},
}

TITLE = "Evaluation report"
PER_CLASS = "Per class"
CAM_FILE = "cam/cam.png"


@dataclass(frozen=True)
class Picture:
    """One picture section: a heading, a sentence on how to read it, and the PNG beside report.md (`file`,
    relative to it) or, when there is none, `file` None and the note saying why. `detail`: text from outside
    (a reason naming layers and architectures) after the note, escaped by each renderer like a class name."""

    title: str
    note: str
    file: str | None
    alt: str
    detail: str = ""


CONFUSION = Picture("Confusion matrix", "Rows: actual class; columns: predicted.", "confusion.png", "confusion matrix")
ERRORS = Picture(
    "Highest-loss test images",
    "The test images the model got most wrong, highest cross-entropy first: confident mistakes lead. Red titles "
    "are wrong predictions; p is the probability of the predicted class. errors.csv lists them by test index.",
    "errors.png",
    "error gallery",
)
CONFUSED = Picture(
    "Most-confused pairs",
    "The most frequent mistakes, actual → predicted, with examples of each, highest loss first.",
    "confused.png",
    "most-confused class pairs",
)
CAM = Picture(
    "Where the model looked",
    "Class-activation maps for the predicted class over a fixed sample of test images.",
    CAM_FILE,
    "class-activation maps",
)
SUMMARY_HEADER = ("metric", "value")
PER_CLASS_HEADER = ("class", "precision", "recall", "F1", "support")


# Class names are data: `a|b` would split a table cell, a newline end the table, `<script>`, `[x](y)`, `$x$`, `*`
# or a backtick would render as HTML, a link, math or emphasis. In markdown they are escaped so the true name shows.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|$~>-])")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def md_text(text: str) -> str:
    """`text` as literal markdown inline text, safe inside a table cell: what renders is `text` itself
    (line breaks as `<br>`, other control characters as `\\xNN`)."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = _LINE_BREAK.sub("<br>", text)
    return _CONTROL.sub(lambda m: f"\\\\x{ord(m.group()):02x}", text)


def html_text(text: str) -> str:
    """`text` as literal HTML text, shown as md_text shows it: line breaks as `<br>`, other control characters
    (not allowed in HTML) as `\\xNN`; `<`, `&` and quotes escaped, so it is safe in an element or an attribute."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    return _LINE_BREAK.sub("<br>", html.escape(text, quote=True))


def summary_table(m: TestMetrics) -> str:
    """A few aligned lines for the terminal."""
    width = max(len(v) for v in SUMMARY_NAMES.values())
    return "\n".join(f"  {SUMMARY_NAMES[k]:<{width}}  {v:.4f}" for k, v in m.summary.items())


@dataclass(frozen=True)
class ReportContent:
    """What the report says, with values formatted once: both renderings read only this, so they cannot
    disagree. Class names stay raw; each renderer escapes them for its format."""

    model: str
    n_test: int
    run_id: str | None
    summary: list[tuple[str, str]]  # (metric name, value)
    per_class: list[tuple[str, str, str, str, str]]  # (class, precision, recall, F1, support)
    pictures: list[Picture]


def report_content(
    m: TestMetrics, classes: list[str], n_test: int, run_id: str | None, model: str, cam_reason: str | None = None
) -> ReportContent:
    """The one place the report's content is decided (what rows, what pictures, how numbers are written).
    `cam_reason`: why no class-activation maps were drawn (None: cam/cam.png exists)."""
    pc = m.per_class
    calibration = Picture(
        "Calibration",
        f"Accuracy against confidence (the top-1 probability) in {CALIBRATION_BINS} equal-width bins, the bins' "
        f"image counts below; the dashed diagonal is perfect calibration. ECE {m.summary['ece']:.4f}.",
        "calibration.png",
        "reliability diagram",
    )
    cam = CAM if cam_reason is None else Picture(CAM.title, "Not drawn:", None, CAM.alt, cam_reason)
    return ReportContent(
        model=model,
        n_test=n_test,
        run_id=run_id,
        summary=[(SUMMARY_NAMES[k], f"{v:.4f}") for k, v in m.summary.items()],
        per_class=[
            (
                name,
                f"{pc['precision'][i]:.4f}",
                f"{pc['recall'][i]:.4f}",
                f"{pc['f1'][i]:.4f}",
                str(int(pc["support"][i])),
            )
            for i, name in enumerate(classes)
        ],
        pictures=[CONFUSION, ERRORS, CONFUSED, calibration, cam],
    )


def render_markdown(r: ReportContent) -> str:
    """report.md: each picture is the file beside it (confusion.png, ...), as git hosts and editors show it."""

    def row(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [
        f"# {TITLE}",
        "",
        f"Model `{r.model}` on the test split ({r.n_test} images)"
        + (f", MLflow run `{r.run_id}`." if r.run_id else "."),
        "",
        row(SUMMARY_HEADER),
        "|---|---|",
        *(row(cells) for cells in r.summary),
        "",
        f"## {PER_CLASS}",
        "",
        row(PER_CLASS_HEADER),
        "|---|---|---|---|---|",
        *(row((md_text(name), *values)) for name, *values in r.per_class),
        "",
    ]
    for p in r.pictures:
        note = f"{p.note} {md_text(p.detail)}" if p.detail else p.note
        lines += [f"## {p.title}", "", note, ""] + ([f"![{p.alt}]({p.file})", ""] if p.file else [])
    return "\n".join(lines)


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1rem;color:#111;background:#fff}"
    "table{border-collapse:collapse;margin:.5rem 0 1rem}"
    "th,td{border:1px solid #ccc;padding:.2rem .6rem;text-align:left}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "img{max-width:100%;height:auto}"
)


def render_html(r: ReportContent, png: Mapping[str, bytes]) -> str:
    """report.html: one self-contained page, each picture embedded as a `data:` URI (no other file to fetch),
    UTF-8 declared (MLflow shows it from a Blob without a charset, so non-ASCII class names need the meta).
    `png`: the bytes of each picture the content names, by its `file`."""

    def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
        """First column a name, the others numbers (right-aligned)."""
        head = "".join(f"<th>{html_text(h)}</th>" for h in header)
        body = "".join(
            f"<tr><td>{html_text(name)}</td>"
            + "".join(f'<td class="n">{html_text(v)}</td>' for v in values)
            + "</tr>\n"
            for name, *values in rows
        )
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"

    def picture(p: Picture) -> list[str]:
        note = f"{p.note} {p.detail}" if p.detail else p.note
        lines = [f"<h2>{html_text(p.title)}</h2>", f"<p>{html_text(note)}</p>"]
        if p.file:
            data = base64.b64encode(png[p.file]).decode("ascii")
            lines.append(f'<img src="data:image/png;base64,{data}" alt="{html_text(p.alt)}">')
        return lines

    run = f", MLflow run <code>{html_text(r.run_id)}</code>." if r.run_id else "."
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html_text(TITLE)}</title>",
            f"<style>{_STYLE}</style>",
            "</head>",
            "<body>",
            f"<h1>{html_text(TITLE)}</h1>",
            f"<p>Model <code>{html_text(r.model)}</code> on the test split ({r.n_test} images){run}</p>",
            table(SUMMARY_HEADER, r.summary),
            f"<h2>{html_text(PER_CLASS)}</h2>",
            table(PER_CLASS_HEADER, r.per_class),
            *(line for p in r.pictures for line in picture(p)),
            "</body>",
            "</html>",
            "",
        ]
    )


def report_markdown(
    m: TestMetrics, classes: list[str], n_test: int, run_id: str | None, model: str, cam_reason: str | None = None
) -> str:
    return render_markdown(report_content(m, classes, n_test, run_id, model, cam_reason))


def report_html(
    m: TestMetrics,
    classes: list[str],
    n_test: int,
    run_id: str | None,
    model: str,
    png: Mapping[str, bytes],
    cam_reason: str | None = None,
) -> str:
    return render_html(report_content(m, classes, n_test, run_id, model, cam_reason), png)
