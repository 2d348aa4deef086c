"""The package layers of docs/design.md ("Layers") hold: a module imports only its own package and the layers
below it, function-level imports included, so no two packages depend on each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import imported_modules

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cnnpipe"

# Bottom to top, as docs/design.md draws them; a unit is a sub-package or a top-level module of cnnpipe.
LAYERS = [
    {"errors", "console", "processes", "redact"},
    {"atomic", "registry"},
    {"config", "figures", "offline_plots"},
    {"evaluation", "threads", "data", "monitoring"},
    {"models"},
    {"tracking"},
    {"training", "serving"},
    {"tuning"},
    {"stages"},
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """`cnnpipe.data.store` -> `data`; `cnnpipe.config` -> `config`; `cnnpipe` -> `` (the package face)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_of(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(text: str, package: str) -> set[str]:
    """Every cnnpipe module the code `text` of a module in `package` imports, at any depth (relative imports
    resolved)."""
    return {n for n in imported_modules(ast.parse(text), package) if n == PACKAGE or n.startswith(f"{PACKAGE}.")}


def upward(text: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `module` (code `text`) that go to another unit at or above its own layer."""
    here = unit_of(module)
    package = module if is_package else module.rpartition(".")[0]
    return sorted(
        name
        for name in project_imports(text, package)
        # a name that is no unit (`from cnnpipe import __version__`) is the package face's; every real unit has a
        # layer (test_every_unit_has_a_layer)
        if (there := unit_of(name)) in LEVEL and there != here and LEVEL[there] >= LEVEL[here]
    )


def modules() -> list[Path]:
    return sorted(p for p in (SRC / PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_of(p)) for p in modules()} - {""}
    assert units == set(LEVEL), f"units without a layer: {units - set(LEVEL)}; layers of no unit: {set(LEVEL) - units}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_a_module_imports_only_its_own_unit_and_the_layers_below(path: Path) -> None:
    module = module_of(path)
    if not unit_of(module):
        return  # cnnpipe/__init__.py: the package face
    found = upward(path.read_text(), module, is_package=path.name == "__init__.py")
    assert not found, f"{path.relative_to(SRC)} (layer {LEVEL[unit_of(module)]}) imports at or above its layer: {found}"


def test_the_checker_finds_upward_imports_in_functions_and_relative_ones() -> None:
    text = "def f():\n    from cnnpipe.serving import predict\nfrom ..stages import runner\nfrom . import runs\n"
    found = upward(text, "cnnpipe.tracking.model_logging")
    assert found == ["cnnpipe.serving", "cnnpipe.serving.predict", "cnnpipe.stages", "cnnpipe.stages.runner"]
    assert upward("from cnnpipe import threads\n", "cnnpipe.data.store") == ["cnnpipe.threads"]  # a module by name
    assert upward("from cnnpipe.data.store import Split\n", "cnnpipe.tracking.datasets") == []  # a lower layer
    assert upward("import cnnpipe.threads\n", "cnnpipe.data.store") == ["cnnpipe.threads"]  # same layer, other unit
