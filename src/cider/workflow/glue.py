"""Script glue: config and wildcards for a rule script, under Snakemake or from the shell."""

from __future__ import annotations

import ctypes
import os
import sys
from copy import deepcopy
from pathlib import Path

from .config import load_config, validate_config

ALLOW_CPU_ENV = "CIDER_ALLOW_CPU"  # "1": a job given a GPU may still run on CPU (test clusters)


MMAP_THRESHOLD = 256 * 1024  # bytes: larger allocations get their own mapping, freed at once


def _fixed_mmap_threshold() -> None:
    """Keep a job's memory at what it holds: fix glibc's mmap threshold (Linux only).

    glibc raises its threshold after large blocks are freed, so the plane- and window-
    sized buffers of a streamed rule then come from the heap and stay resident: a
    background job on 128 planes grew to 2.6 GB instead of 0.4 GB (bench/scale.py). Not
    for ``fit``: its autograd tensors are allocated every iteration, and a fixed threshold
    would map and unmap each of them: a 128² CPU fit took 11.3 s instead of 6.1–7.1 s.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    libc.mallopt(-3, MMAP_THRESHOLD)  # -3 = M_MMAP_THRESHOLD; a fixed value disables the adaptation


def script_args(rule: str, namespace: dict) -> tuple[dict, dict]:
    """Config and wildcards for a rule script, from Snakemake or from the command line.

    Under Snakemake (``script:``) the ``snakemake`` object supplies the validated config
    and wildcards, and stdout/stderr go to the rule's log. Run alone, the script takes
    ``--config FILE`` and ``--batch``/``--group``/``--part``.
    """
    if rule != "fit":  # the fit reallocates its large tensors every iteration (see below)
        _fixed_mmap_threshold()
    smk = namespace.get("snakemake")
    if smk is not None:
        if smk.log:
            Path(smk.log[0]).parent.mkdir(parents=True, exist_ok=True)
            log = open(smk.log[0], "w")  # noqa: SIM115 (kept open for the job's lifetime)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        _set_threads(smk.threads)
        config = validate_config(dict(smk.config))
        return require_gpu(config, int(getattr(smk.resources, "gpu", 0) or 0)), dict(smk.wildcards)
    import argparse

    parser = argparse.ArgumentParser(description=f"run the '{rule}' rule of the cider workflow alone")
    parser.add_argument("--config", default="config/config.yaml", help="dataset config (YAML)")
    for key in ("batch", "group", "part"):
        parser.add_argument(f"--{key}", help=f"the rule's {key} wildcard")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _set_threads(args.threads)
    wildcards = {k: getattr(args, k) for k in ("batch", "group", "part") if getattr(args, k)}
    return load_config(args.config), wildcards


def require_gpu(config: dict, gpus: int) -> dict:
    """A job its profile gave a GPU runs on CUDA or fails at start, never silently on CPU.

    With ``restore.device: auto`` and ``gpus > 0`` the device becomes ``cuda``, so a node
    without a usable CUDA (wrong torch build, driver, no device) fails the job at once with
    :func:`cider.restore.resolve_device`'s message. ``$CIDER_ALLOW_CPU=1`` lets such a job
    run on CPU (test clusters whose "GPU" partition has none).
    """
    if gpus > 0 and config["restore"]["device"] == "auto" and os.environ.get(ALLOW_CPU_ENV) != "1":
        config = deepcopy(config)
        config["restore"]["device"] = "cuda"
    return config


def _set_threads(threads: int) -> None:
    """Use the rule's threads, but never more than the CPUs this process may run on
    (a node that over-reports CPUs would otherwise make torch oversubscribe them)."""
    import torch

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(int(threads), available)))
