"""`pipelines/plots.py` makes a `dvc plots show` page that renders with no network (issue #17).

One tiny DVC repo with this project's plot definitions (copied from dvc.yaml at test time) and hand-made data
shaped like train's and evaluate's outputs. The page must load nothing remote, and headless Chromium with every
host name unresolvable must draw each Vega plot. DVC's default page for the same repo is the control: under the
same block it must draw nothing, so a passing test means the page is offline, not that the network was up.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import yaml

from tests.helpers import CHROMIUM_FLAGS, ROOT, dvc, stage_env, write_png

# evaluate's confusion records and train's history.csv columns, as the stages write them
HISTORY = """epoch,train/loss,train/acc,val/loss,val/acc,val/f1_macro,lr
0,2.201939,0.167789,1.101453,0.677778,0.637148,0.000422
1,0.783493,0.742599,0.186342,0.938562,0.938352,0.001203
2,0.301215,0.901004,0.120551,0.961438,0.960917,0.000874
"""
CONFUSION = [{"actual": a, "predicted": p} for a, p in [("0", "0"), ("0", "1"), ("1", "1"), ("2", "2"), ("2", "1")]]
CALIBRATION = [
    {"bin": 13, "confidence": 0.9, "accuracy": 0.75, "count": 4},
    {"bin": 14, "confidence": 0.99, "accuracy": 1.0, "count": 40},
]
# The mark each Vega plot must draw (SVG renderer): DVC's `linear`, `confusion` and `scatter` templates.
EXPECTED_MARKS = {
    "training_curves": "mark-line",
    "eval_confusion_json": "mark-rect",
    "eval_calibration_json": "mark-symbol",
}


def plots_repo(folder: Path) -> Path:
    """A DVC repo holding dvc.yaml's `plots:` and evaluate's plot definitions verbatim, and files for each."""
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    spec = {
        # never run: the test writes the stage's plot file itself
        "stages": {"evaluate": {"cmd": "python -c pass", "plots": real["stages"]["evaluate"]["plots"]}},
        "plots": real["plots"],
    }
    folder.mkdir()
    (folder / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "params.yaml").write_text(yaml.safe_dump({"paths": params["paths"]}))  # for ${paths.*}
    paths = params["paths"]
    pixels = np.full((8, 8, 3), 200, dtype=np.uint8)
    for entry in real["plots"]:  # every image plot dvc.yaml names, written under its ${paths.*} folder
        if isinstance(entry, str) and entry.endswith(".png"):
            found = re.fullmatch(r"\$\{paths\.(\w+)\}/(.+)", entry)
            assert found, entry
            write_png(folder / paths[found[1]] / found[2], pixels)
    (folder / paths["models"] / "history.csv").write_text(HISTORY)
    (folder / paths["eval"] / "confusion.json").write_text(json.dumps(CONFUSION, indent=2))
    (folder / paths["eval"] / "calibration.json").write_text(json.dumps(CALIBRATION, indent=2))
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    dvc("init", "-q", cwd=folder)
    return folder


class RemoteLoads(HTMLParser):
    """Every <script src> (all scripts must be inline), and every attribute that makes a browser fetch something
    with a remote or protocol-relative URL; counts <script> tags, so a page the parser did not read cannot pass."""

    FETCHING = frozenset({"src", "href", "data", "srcset", "poster", "action", "formaction", "background"})

    def __init__(self) -> None:
        super().__init__()
        self.scripts = 0
        self.loads: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        for name, value in attrs:
            remote = re.match(r"\s*(https?:)?//", value or "", re.IGNORECASE)
            if (tag == "script" and name == "src") or (name in self.FETCHING and remote):
                self.loads.append(f"<{tag} {name}={value}>")


def remote_loads(html: str) -> tuple[int, list[str]]:
    """(number of <script> tags, what would load from elsewhere: script files, remote attributes, and CDN hosts
    or ES imports of URLs anywhere in the text, inline code included)."""
    parser = RemoteLoads()
    parser.feed(html)
    found = list(parser.loads)
    for pattern in (
        r"https?://cdn",
        r"cdn\.jsdelivr|unpkg\.com|cdnjs",
        r"""(?:import\s*\(|from)\s*["'`](?:https?:)?//""",
    ):
        found += re.findall(pattern, html, re.IGNORECASE)
    return parser.scripts, found


def start_chromium(chromium: str, page: Path, profile: Path) -> subprocess.Popen[str]:
    """Chromium loading `page` with every host name unresolvable; its stdout is the DOM after Vega ran."""
    cmd = [
        chromium,
        *CHROMIUM_FLAGS,
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        page.as_uri(),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def dom_of(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}"
    return out


def plot_sections(dom: str, ids: list[str]) -> dict[str, str]:
    """Each plot div's part of the DOM: from its opening tag to the next plot's."""
    starts = {i: dom.find(f'<div id="{i}"') for i in ids}
    assert all(s >= 0 for s in starts.values()), f"plot divs missing from the DOM: {starts}"
    order = sorted(ids, key=starts.__getitem__)
    ends = [starts[i] for i in order[1:]] + [len(dom)]
    return {i: dom[starts[i] : end] for i, end in zip(order, ends, strict=True)}


def drawn(section: str, mark: str) -> bool:
    """A Vega view drew its data: an SVG with the plot's marks, or a canvas (no marks to see there)."""
    svg = re.search(r'<svg[^>]*class="marks"', section) and re.search(rf'class="{mark} role-mark', section)
    return bool(svg or "<canvas" in section)


def test_plots_page_renders_with_no_network(tmp_path: Path, chromium: str) -> None:
    repo = plots_repo(tmp_path / "repo")
    control = shutil.copytree(repo, tmp_path / "control")  # DVC's own page, in a repo of its own (DVC's lock)
    ours = subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "plots.py")],
        cwd=repo,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = [ours]
    try:
        default = dvc("plots", "show", cwd=control)
        default_page = control / "dvc_plots" / "index.html"
        assert default.stdout.strip() == default_page.as_uri()
        default_browser = start_chromium(chromium, default_page, tmp_path / "profile-default")  # while ours builds
        started.append(default_browser)
        stdout, stderr = ours.communicate(timeout=300)
        assert ours.returncode == 0, stderr
        assert "failed to load" not in stderr, stderr  # every plot, images included, was found
        index = repo / "dvc_plots" / "index.html"
        assert stdout.splitlines() == [str(index)], stdout  # one line: the page to open
        assert (repo / ".dvc" / "plots-offline.html").is_file()
        browser = start_chromium(chromium, index, tmp_path / "profile")
        started.append(browser)

        html = index.read_text(encoding="utf-8")
        ids = re.findall(r"vegaEmbed\('#([^']+)'", html)
        assert sorted(ids) == sorted(EXPECTED_MARKS), ids
        scripts, remote = remote_loads(html)
        assert scripts > len(ids) and not remote, remote  # the bundle's <script> + one per plot, all inline
        assert "window.vegaEmbed=" in html  # the libraries are in the page itself
        assert remote_loads(default_page.read_text(encoding="utf-8"))[1], "the check misses DVC's CDN scripts"

        for plot_id, section in plot_sections(dom_of(browser), ids).items():
            assert drawn(section, EXPECTED_MARKS[plot_id]), f"plot {plot_id} did not render offline:\n{section[:2000]}"
        for plot_id, section in plot_sections(dom_of(default_browser), ids).items():
            assert not drawn(section, EXPECTED_MARKS[plot_id]), f"DVC's CDN page drew {plot_id}: network not blocked"
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
