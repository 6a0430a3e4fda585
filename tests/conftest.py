"""Shared fixtures: seeded synthetic data, the shared data folder, device selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def blobs(shape: tuple[int, ...], count: int, seed: int = 0) -> np.ndarray:
    """Deterministic test object: ``count`` random boxes with soft edges, values in [0, 1]."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = np.zeros(shape)
    for _ in range(count):
        centre = [rng.integers(min(3, n // 2), max(n - 3, n // 2 + 1)) for n in shape]
        half = [rng.integers(1, 3) if n > 6 else 0 for n in shape]
        x[tuple(slice(c - h, c + h + 1) for c, h in zip(centre, half))] = rng.uniform(0.3, 1.0)
    return gaussian_filter(x, 0.7)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB."""
    return float(10 * np.log10(peak**2 / np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


@pytest.fixture
def shared_data() -> Path:
    """The ``../shared/data`` folder beside the checkout (skips where it is absent)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Run a test on the CPU and, where CUDA exists, on the GPU."""
    return request.param
