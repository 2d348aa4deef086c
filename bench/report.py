"""Regenerate docs/benchmarks.md from every bench/results/*.json (and bench/findings.md, written by hand).

Run alone: python -m bench.report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.timing import RESULTS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
FINDINGS = Path(__file__).resolve().parent / "findings.md"
RUN_FILE = RESULTS / "_run_all.json"  # timings of the last run_all (not a table row)
ORDER = ["B1", "B2", "B3", "B5", "B7", "B8", "pruning", "transfer", "prepare_checks", "monitor_drift", "GPU"]
# Rows shown when a benchmark has no result file: why it was not measured.
NOT_MEASURED = {
    "B7": (
        "DDP scaling: 2 processes x 1 thread vs 1 process x 1 and x 2 threads",
        "not measured yet: run `python -m bench.ddp_scaling`",
    ),
    "GPU": (
        "B1 on a GPU: resnet_small on CIFAR-sized synthetic data (3x32x32), bf16-mixed + channels_last; "
        "images/s and MFU against the GPU's bf16 peak",
        "not measured: no GPU on the machine that ran it; where there is one: "
        "`python -m bench.b1_train_step --data cifar-synthetic --device cuda`",
    ),
    "GPU-timm": (
        "B1 with timm resnet50 / vit_base_patch16_224 at 224 px on a GPU, bf16-mixed: images/s and MFU against a "
        "hand-written loop",
        "not measured: no GPU on the machine that ran it; where there is one: `python -m bench.b1_train_step "
        "--data cifar-synthetic --model timm --arch resnet50 --size 224 --device cuda` (and `--arch "
        "vit_base_patch16_224`; 20,000 images, 2 epochs, 5 repeats by default there)",
    ),
}


def _measured_elsewhere(placeholder: str, results: dict[str, dict[str, Any]]) -> bool:
    """Whether a placeholder row's benchmark has a result under its real name."""
    if placeholder == "GPU":
        return any(r["machine"].get("gpu") for r in results.values())
    if placeholder == "GPU-timm":
        return any(n.startswith("B1-timm-") and n.endswith("-cuda") for n in results)
    return False


def ordered(names: set[str]) -> list[str]:
    """ORDER first, each followed by its variants (B1-mnist5k, B1-cuda after B1), then anything else."""
    out: list[str] = []
    for base in ORDER:
        out += [n for n in [base] if n in names]
        out += sorted(n for n in names if n.startswith(f"{base}-") or n.startswith(f"{base}_"))
    return out + sorted(names - set(out))


def load_results() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.startswith("_"):
            continue
        record = json.loads(path.read_text())
        out[record["name"]] = record
    return out


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ratio(record: dict[str, Any]) -> str:
    if record.get("ratio_text"):
        return record["ratio_text"]
    ratio = record.get("ratio")
    if ratio is None:
        return "—"
    return f"{ratio:.4f}" if abs(ratio) < 10 else f"{ratio:.1f}"


def _met(record: dict[str, Any]) -> str:
    met = record.get("met")
    return "—" if met is None else ("yes" if met else "**no**")


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    results = {k: v for k, v in results.items() if v.get("table", True)}  # B1_profile: details only
    lines = [
        "| benchmark | what | ours | baseline | ratio | goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    in_last_run = set(json.loads(RUN_FILE.read_text()).get("only", [])) if RUN_FILE.is_file() else set(results)
    by_hand = False
    placeholders = {n for n in NOT_MEASURED if n not in results and not _measured_elsewhere(n, results)}
    for name in ordered(set(results) | placeholders):
        r = results.get(name)
        if r is None:
            what, why = NOT_MEASURED[name]
            lines.append(f"| {name} | {_cell(what)} | {_cell(why)} | — | — | — | — |")
            continue
        quick = " (quick)" if r.get("quick") else ""
        mark = "" if name in in_last_run else " †"
        by_hand = by_hand or bool(mark)
        lines.append(
            f"| {name}{quick}{mark} | {_cell(r['what'])} | {_cell(r['ours'])} | {_cell(r['baseline'])} | {_ratio(r)} "
            f"| {_cell(r['goal'])} | {_met(r)} |"
        )
    if by_hand:
        lines += [
            "",
            "† run by hand, not by `make bench` (`b1_train_step --data mnist5k` or `--data cifar-synthetic`,",
            "`--model timm --arch resnet18 --size 64`, `--device cuda` on a GPU machine, `pruning --set ...`,",
            "`transfer --backbone-lr 0.1` or `--tints inverted`; a benchmark added since the last `make bench`);",
            "its date and machine are in the details below.",
        ]
    return lines


def _machine(m: dict[str, Any]) -> str:
    return (
        f"nproc {m.get('nproc')}, {m.get('cpu') or 'cpu ?'}, torch {m.get('torch')}, torch threads "
        f"{m.get('torch_threads')} (OMP_NUM_THREADS={m.get('omp_num_threads')}), Python {m.get('python')}, "
        f"GPU {m.get('gpu') or 'none'}, 1-min load average at start {m.get('load_avg_1m_at_start')}"
    )


def _detail_lines(details: dict[str, Any], prefix: str = "") -> list[str]:
    """The scalar facts and medians of a record's details (long sample lists stay in the JSON)."""
    lines = []
    for name, value in details.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and set(value) >= {"median", "min", "max"}:
            lines.append(f"- {key}: median {value['median']:,.4g} (min {value['min']:,.4g}, max {value['max']:,.4g})")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            shown = f"{value:,.4g}" if isinstance(value, float) else value
            lines.append(f"- {key}: {shown}")
        elif isinstance(value, list) and len(value) <= 12 and all(isinstance(v, (int, float, str)) for v in value):
            lines.append(f"- {key}: " + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value))
        elif isinstance(value, dict) and not prefix:
            lines += _detail_lines(value, f"{key}.")
    return lines


def details(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name in ordered(set(results)):
        r = results[name]
        lines += ["", f"### {name}: {r['title']}", "", f"Measured {r['date']} on: {_machine(r['machine'])}.", ""]
        lines += _detail_lines(r.get("details", {}))
        for note in r.get("notes", []):
            lines.append(f"- note: {note}")
        lines.append(f"- raw data: `bench/results/{name}.json`")
    return lines


def run_summary() -> list[str]:
    if not RUN_FILE.is_file():
        return []
    run = json.loads(RUN_FILE.read_text())
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in run["seconds"].items())
    mode = "quick" if run.get("quick") else "full"
    failed = f" Failed: {', '.join(run['failed'])}." if run.get("failed") else ""
    return [
        "",
        f"Last `make bench` ({mode} settings, {run['date']}): {run['total_s'] / 60:.1f} min in total ({parts})."
        + failed,
    ]


def render() -> str:
    results = load_results()
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench.run_all`) from `bench/results/*.json`; do not edit by hand",
        "(hand-written findings live in `bench/findings.md` and are included below). Benchmarks are not tests:",
        "nothing in tests/ asserts a timing.",
        "",
        "Method: each comparison runs its two sides interleaved (A, B, A, B, ...) after a warm-up of each side,",
        "with the same model, data, batch size, thread count and seed on both sides; the ratio is the median of the",
        "per-repeat ratios, next to each side's median. The machine is shared (other people's tests run on the same",
        "2 cores), so single numbers move by 5-30 %; the interleaving is what keeps the ratios meaningful.",
        "Benchmarks pin 1 torch/OpenMP thread per process unless they say otherwise (`--threads N`).",
        "",
        *table(results),
        *run_summary(),
        "",
        "Run: `make bench` (all, ~20 min), `make bench BENCH_ARGS='--only B1,B2'`, `BENCH_ARGS=--quick` (smoke test),",
        "or one alone: `python -m bench.b1_train_step`, `bench.b2_augment`, `bench.b3_time_to_accuracy`,",
        "`bench.b5_mlflow_logging`, `bench.b8_noop_repro`, `bench.pruning`, `bench.ddp_scaling`, `bench.transfer`,",
        "`bench.prepare_checks`, `bench.monitor_drift`;",
        "`python -m bench.b1_profile` profiles B1's train step; `python -m bench.report` rebuilds this page.",
    ]
    if FINDINGS.is_file():
        lines += ["", FINDINGS.read_text().rstrip()]
    lines += ["", "## Details", *details(results), ""]
    return "\n".join(lines)


def write() -> Path:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(render())
    tmp.replace(DOC)
    print(f"[report] wrote {DOC}")
    return DOC


if __name__ == "__main__":
    write()
