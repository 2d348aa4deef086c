"""The human-readable evaluation report: a short table on the terminal and eval/report.md."""

from __future__ import annotations

import re

from cnnpipe.evaluation.metrics import TestMetrics

SUMMARY_NAMES = {
    "acc": "accuracy",
    "f1_macro": "macro F1",
    "precision_macro": "macro precision",
    "recall_macro": "macro recall",
    "ece": "calibration error (ECE)",
    "loss": "cross-entropy",
}


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


def summary_table(m: TestMetrics) -> str:
    """A few aligned lines for the terminal."""
    width = max(len(v) for v in SUMMARY_NAMES.values())
    return "\n".join(f"  {SUMMARY_NAMES[k]:<{width}}  {v:.4f}" for k, v in m.summary.items())


def report_markdown(m: TestMetrics, classes: list[str], n_test: int, run_id: str | None, model: str) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Model `{model}` on the test split ({n_test} images)" + (f", MLflow run `{run_id}`." if run_id else "."),
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {SUMMARY_NAMES[k]} | {v:.4f} |" for k, v in m.summary.items()),
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    pc = m.per_class
    for i, name in enumerate(classes):
        lines.append(
            f"| {md_text(name)} | {pc['precision'][i]:.4f} | {pc['recall'][i]:.4f} | {pc['f1'][i]:.4f} | "
            f"{int(pc['support'][i])} |"
        )
    lines += [
        "",
        "## Confusion matrix",
        "",
        "Rows: actual class; columns: predicted.",
        "",
        "![confusion matrix](confusion.png)",
        "",
    ]
    return "\n".join(lines)
