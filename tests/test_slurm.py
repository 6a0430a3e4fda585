"""The real ``profiles/slurm`` profile against a running SLURM cluster.

CI starts a single-node cluster with ``.ci/slurm/start.sh`` (see the Makefile's ``test``
target); elsewhere these tests are skipped. CI-only overrides of site settings, given on
the command line below and nowhere else: ``--slurm-status-command squeue`` (the CI
cluster has no accounting database, so ``sacct`` cannot work), status polling every 2 s
without the plugin's back-off (``tests/slurm_client.py``), and ``$CIDER_ALLOW_CPU=1``
(the CI cluster's "gpu" partition has no GPU; a real GPU job without CUDA fails at
start). Partitions (``cpu``, ``gpu``), GPU requests, retries and batch grouping come from
the profile unchanged. The polling and one clean run shared by two tests cut these tests
from 15.7 to 8 minutes on a 2-core machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cider.workflow import ALLOW_CPU_ENV, FAIL_ENV

from . import test_workflow
from .conftest import ROOT
from .test_workflow import _dataset


def _slurm_ready() -> str | None:
    if shutil.which("sinfo") is None:
        return "no SLURM on this machine (CI starts one with .ci/slurm/start.sh)"
    out = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True)
    if out.returncode or not re.search(r"gpu\s+(idle|mix|alloc)", out.stdout):
        return f"SLURM not ready or no 'gpu' partition: {out.stdout.strip() or out.stderr.strip()}"
    return None


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(_slurm_ready() is not None, reason=str(_slurm_ready())),
]

CI_OVERRIDES = [
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "2",
    "--slurm-keep-successful-logs",
]


def _command(config: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).with_name("slurm_client.py")),  # Snakemake, polling every 2 s
        "-s",
        str(ROOT / "Snakefile"),
        "--profile",
        str(ROOT / "profiles" / "slurm"),
        "--directory",
        str(config.parent),
        "--configfile",
        str(config),
        *CI_OVERRIDES,
        *extra,
    ]


def _run(config: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(config, *extra),
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, ALLOW_CPU_ENV: "1", **(env or {})},
    )


def _job_ids(folder: Path, rule: str) -> list[str]:
    logs = (folder / ".snakemake" / "slurm_logs").glob(f"{rule}/**/*.log")
    return sorted(p.stem for p in logs)


def _fit_jobs(folder: Path) -> list[str]:
    """SLURM jobs of the fit rule: group jobs of group "restore" (or lone rule jobs)."""
    return _job_ids(folder, "group_restore*") + _job_ids(folder, "rule_fit")


def _scontrol(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


SMALL_RUN = {**test_workflow.SMALL_RUN, "iterations": 15}
# 4 tiles in batches of 2 (b0: t0, t1; b1: t2, t3), both fit jobs in one "restore" group


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """An uninterrupted run of SMALL_RUN through the profile: its folder."""
    folder = tmp_path_factory.mktemp("clean")
    run = _run(_dataset(folder, **SMALL_RUN))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "has been submitted with SLURM jobid" in run.stdout + run.stderr
    return folder


def test_profile_runs_through_slurm_with_gpu_groups(clean_run):
    groups = _fit_jobs(clean_run)
    assert len(groups) == 1, groups  # 2 batches, 2 fit jobs, in one SLURM job of their group
    info = _scontrol(groups[0])
    assert "Partition=gpu" in info and "gpu:1" in info, info
    assert "cpu=4" in info and "mem=32000M" in info  # not 2× (the group runs its batches in series)
    assert _job_ids(clean_run, "rule_prepare") and _job_ids(clean_run, "rule_stitch")
    assert (clean_run / "out" / "input.ome.zarr").is_dir()


def test_failed_batch_is_retried_then_rerun_alone(tmp_path, clean_run):
    """Tile t1 fails, so batch b0 does; it is retried, fails again, and the rerun fits it alone."""
    fail_dir = tmp_path / "fail"
    fail_dir.mkdir()
    failing = _dataset(fail_dir, **SMALL_RUN)
    first = _run(failing, "--retries", "1", env={FAIL_ENV: "u000-t00001"})
    assert first.returncode != 0
    log = first.stdout + first.stderr
    assert "Error in group restore" in log or "Error in rule fit" in log
    assert "u000-t00001" in log + (fail_dir / "out" / "work" / "logs" / "fit" / "b0.log").read_text()
    assert len(_fit_jobs(fail_dir)) >= 2  # submitted, failed, retried
    assert not (fail_dir / "out" / "work" / "tiles" / "b0.npz").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (fail_dir / "out" / "work" / "tiles").glob("*.npz")}
    assert set(done) <= {"b1.npz"}  # b1 finished if the group job went on past b0's failure
    second = _run(failing, "--rerun-incomplete")
    assert second.returncode == 0, second.stderr[-3000:]
    tiles = fail_dir / "out" / "work" / "tiles"
    assert all(
        (tiles / name).stat().st_mtime_ns == t for name, t in done.items()
    )  # the finished batch is not redone
    np.testing.assert_array_equal(
        tifffile.imread(clean_run / "out" / "input.tif"), tifffile.imread(fail_dir / "out" / "input.tif")
    )


def test_scancel_of_a_running_tile_job_is_not_marked_done(tmp_path):
    config = _dataset(tmp_path, (60, 60), 1.2, 32, iterations=100)
    process = subprocess.Popen(
        _command(config, "--retries", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, ALLOW_CPU_ENV: "1"},
    )
    job = None
    for _ in range(240):
        out = subprocess.run(
            ["squeue", "-h", "-p", "gpu", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True
        )
        if out.stdout.strip():
            job = out.stdout.split()[0]
            break
        time.sleep(1)
    assert job, "no tile job started running"
    time.sleep(6)  # inside the group job (the fit of its one batch of 4 tiles)
    subprocess.run(["scancel", job], check=True)
    process.communicate(timeout=600)
    assert process.returncode != 0
    tiles = tmp_path / "out" / "work" / "tiles" / "b0.npz"
    assert not tiles.exists(), "the cancelled job's tiles must not look finished"
    second = _run(config, "--rerun-incomplete")
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(np.load(tiles).files) == ["u000-t00000", "u000-t00001", "u000-t00002", "u000-t00003"]
    assert (tmp_path / "out" / "input.ome.zarr").is_dir()
