"""The package works installed from its wheel, outside the checkout (not only editable)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .conftest import ROOT
from .test_workflow import _dataset


def _run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_the_wheel_works_installed_outside_the_checkout(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    wheel = _run(
        "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)
    )
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    (built,) = tmp_path.glob("cider_pipeline-*.whl")
    site = tmp_path / "site"
    install = _run("-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(built))
    assert install.returncode == 0, install.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = (
        "import cider, cider.workflow as w; print(cider.__file__); "
        "w.validate_config({'name': 'x', 'input': {'path': 'a.tif', 'axes': 'YX', 'voxel_size': [1, 1]}, "
        "'psf': {'gaussian_sigma': 1.0}, 'output_dir': 'o'})"
    )
    imported = _run("-c", check, cwd=elsewhere, env=env)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.strip().startswith(str(site)), imported.stdout  # not the checkout
    usage = _run("-c", "from cider.cli import main; main(['--help'])", cwd=elsewhere, env=env)
    assert usage.returncode == 0 and "cider restore" in usage.stdout

    config = _dataset(elsewhere, (60, 60), 1.2, 32)
    snakefile = str(ROOT / "Snakefile")
    dry = _run("-m", "snakemake", "-s", snakefile, "-n", "--configfile", str(config), cwd=elsewhere, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "fit" in dry.stdout


def test_the_pins_satisfy_the_declared_ranges():
    """pyproject.toml gives ranges, constraints.txt the tested versions: every dependency
    has one pin inside its range, and make and the rule environment install with it."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    for requirement in declared:
        if requirement.name == project["name"]:
            continue
        assert "==" not in str(requirement.specifier), (
            f"{requirement}: an exact pin belongs in constraints.txt"
        )
        assert requirement.name.lower() in pins, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[requirement.name.lower()]), requirement
    assert pins["torch"] == "2.13.0"
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    assert "-c ../constraints.txt" in (ROOT / "envs" / "cider.yaml").read_text()
