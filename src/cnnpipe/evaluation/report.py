"""The human-readable evaluation report: a short table on the terminal and eval/report.md."""

from __future__ import annotations

from cnnpipe.evaluation.metrics import TestMetrics

SUMMARY_NAMES = {
    "acc": "accuracy",
    "f1_macro": "macro F1",
    "precision_macro": "macro precision",
    "recall_macro": "macro recall",
    "ece": "calibration error (ECE)",
    "loss": "cross-entropy",
}


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
            f"| {name} | {pc['precision'][i]:.4f} | {pc['recall'][i]:.4f} | {pc['f1'][i]:.4f} | "
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
