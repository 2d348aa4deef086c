"""dvc.yaml's code deps are complete: every project module a stage can load is covered by one of its deps.

A stale output that DVC calls up to date is a wrong result, so this reads the imports statically (every
`import` and `from ... import`, function-level ones included, which an import-time check would miss) from each
stage's entry in `pipelines/` through the whole `cnnpipe` package, and checks the closure against the deps.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from tests.helpers import imported_modules

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "cnnpipe"


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def imported_names(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports (a `from m import x` may import submodule m.x),
    plus modules started with `python -m cnnpipe...` from a string in the code."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).rpartition(".")[0] if path.is_relative_to(SRC) else ""
    names = imported_modules(tree, package)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(f"{PACKAGE}."):
                names.add(node.value)
            elif node.value.endswith(".py") and (path.parent / node.value).is_file():  # a sibling loaded by path
                names.add(_module_name(path.parent / node.value))
    return {n for n in names if n == PACKAGE or n.startswith(f"{PACKAGE}.")}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


def import_closure(entry: Path) -> set[Path]:
    """Every project file loaded when `entry` runs: the modules and the packages (`__init__.py`) above them."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            parts = name.split(".")
            todo += [f for i in range(1, len(parts) + 1) if (f := module_file(".".join(parts[:i]))) is not None]
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> list[Path]:
    return [ROOT / d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith(("src/", "pipelines/"))]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_loads_is_a_dep_of_that_stage(name: str) -> None:
    stage = stages()[name]
    entry = next(ROOT / arg for arg in shlex.split(stage["cmd"]) if arg.endswith(".py"))
    deps = code_deps(stage)
    missing = sorted(str(p.relative_to(ROOT)) for p in import_closure(entry) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {name!r} loads modules its deps do not cover: {missing}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_code_dep_is_loaded_by_that_stage(name: str) -> None:
    """The other way round: editing a module a stage never loads (the UI's saved view, the predict command)
    does not re-run it. A folder dep is allowed only when the stage loads every module in it."""
    stage = stages()[name]
    entry = next(ROOT / arg for arg in shlex.split(stage["cmd"]) if arg.endswith(".py"))
    loaded = import_closure(entry)
    unused = []
    for dep in code_deps(stage):
        files = sorted(p for p in dep.rglob("*.py") if "__pycache__" not in p.parts) if dep.is_dir() else [dep]
        unused += [str(p.relative_to(ROOT)) for p in files if p.suffix == ".py" and p not in loaded]
    assert not unused, f"dvc.yaml stage {name!r} depends on modules it never loads: {unused}"


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_code_dep_exists(name: str) -> None:
    gone = [str(d.relative_to(ROOT)) for d in code_deps(stages()[name]) if not d.exists()]
    assert not gone, f"dvc.yaml stage {name!r} depends on paths that do not exist: {gone}"


def test_the_closure_follows_function_level_and_module_string_imports(tmp_path: Path) -> None:
    """The checker itself: a lazy import inside a function and a `python -m` module string are followed."""
    entry = tmp_path / "entry.py"
    entry.write_text(
        "def f():\n    from cnnpipe.tracking.registry import load_pyfunc\n"
        "CMD = ['python', '-m', 'cnnpipe.tuning.worker']\n"
    )
    found = {str(p.relative_to(SRC)) for p in import_closure(entry) if p != entry}
    assert {"cnnpipe/tracking/registry.py", "cnnpipe/tuning/worker.py", "cnnpipe/tuning/__init__.py"} <= found
