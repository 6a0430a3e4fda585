"""The imports go one way (README, "Architecture"): each core module imports only the core
modules listed before it, and none imports tiling, io, the CLI or the workflow; tiling and
io import no other cider module."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cider"
# The core in import order: a module may import those before it, never those after it.
CORE = (
    "errors",
    "generator",
    "features",
    "losses",
    "noise",
    "rl",
    "psf",
    "background",
    "restore_config",
    "memory",
    "fitting",
    "restore",
)


def cider_imports(module: str) -> set[str]:
    """The ``cider`` modules that ``src/cider/<module>.py`` imports (first name below
    ``cider``), at any depth of its code."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module == "cider":
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and (node.module or "").startswith("cider."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cider."))
    return found


def test_every_core_module_is_ranked():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "cli", "io", "tiling", "training"}
    assert modules == set(CORE)


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_only_the_core_before_it(module):
    allowed = set(CORE[: CORE.index(module)])
    assert cider_imports(module) <= allowed, f"cider.{module} imports {cider_imports(module) - allowed}"


def test_the_fit_does_not_reach_up_to_restore():
    """What this test guards, shown on the modules that moved for it: the fit's settings
    and input types live below it, so ``cider.fitting`` needs nothing from ``cider.restore``."""
    assert "restore" not in cider_imports("fitting") and "restore_config" in cider_imports("fitting")
    assert cider_imports("restore_config") <= {"background", "errors", "generator"}


@pytest.mark.parametrize("module", ["tiling", "io"])
def test_tiling_and_io_stand_alone(module):
    assert cider_imports(module) == set()
