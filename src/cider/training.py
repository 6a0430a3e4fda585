"""Training of the feature extractor (DWDN-style), on in-memory images.

Objective: blur a sharp patch with a random synthetic kernel (motion or Gaussian), add
light Gaussian noise, extract features, deconvolve every feature map with a Wiener filter
in the Fourier domain (a learned noise-to-signal ratio per channel), and decode the
deconvolved features to the sharp patch with a small CNN. The L1 error trains the
extractor and the decoder end to end; only the extractor is kept. Blur and Wiener filter
are circular, so the training pairs are exact and need no boundary handling.

Nothing here reads files: :func:`train_feature_extractor` takes a list of arrays.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .features import FeatureExtractor
from .restore_config import RestoreConfig
from .rl import BlurOperator, from_positive, richardson_lucy, to_positive

FEATURE_OFFSET = RestoreConfig.feature_offset  # the default positivity map RL sees at restoration time

__all__ = [
    "TrainConfig",
    "motion_kernel",
    "gaussian_kernel",
    "defocus_kernel",
    "random_kernel",
    "train_feature_extractor",
]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :func:`train_feature_extractor` (defaults: ≈ 30 min on 1 CPU core).

    The defaults made the shipped weights. The degradations can be broadened: the share
    of motion, Gaussian and defocus kernels (``kernel_mix``); Poisson noise on a share
    of the patches (``poisson_fraction``) at a peak photon count drawn log-uniformly
    from ``photons``, before the Gaussian noise; and the deconvolution of the features
    in training, ``wiener`` (a learned noise-to-signal ratio per channel) or ``rl``
    (``rl_iterations`` of Richardson–Lucy on the positively mapped features, as
    :func:`cider.restore.deconvolved_features` does at restoration time).
    """

    steps: int = 2500
    batch_size: int = 12
    patch_size: int = 96
    kernel_size: int = 31
    learning_rate: float = 1e-3
    noise_max: float = 0.01
    seed: int = 0
    threads: int = 1
    kernel_mix: tuple[float, float, float] = (0.7, 0.3, 0.0)
    poisson_fraction: float = 0.0
    photons: tuple[float, float] = (100.0, 10000.0)
    deconvolution: str = "wiener"
    rl_iterations: int = 20

    def __post_init__(self):
        if self.deconvolution not in ("wiener", "rl"):
            raise ValueError(f"TrainConfig.deconvolution: {self.deconvolution!r}; use 'wiener' or 'rl'")
        if len(self.kernel_mix) != 3 or min(self.kernel_mix) < 0 or abs(sum(self.kernel_mix) - 1) > 1e-6:
            raise ValueError(f"TrainConfig.kernel_mix: {self.kernel_mix}; three shares ≥ 0 summing to 1")


def motion_kernel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random camera-shake kernel: a smooth random walk splatted on a ``size``² grid."""
    length = rng.uniform(0.2, 1.0) * (size - 3) / 2
    steps = 64
    angle = rng.uniform(0, 2 * np.pi)
    turn = rng.normal(0, 0.25, steps).cumsum() * rng.uniform(0.1, 1.0)
    direction = np.stack([np.sin(angle + turn), np.cos(angle + turn)], axis=1)
    path = np.cumsum(direction, axis=0) * (2 * length / steps)
    path -= path.mean(axis=0)
    path = np.clip(path + size // 2, 0, size - 1.001)
    kernel = np.zeros((size, size))
    speed = rng.uniform(0.5, 1.5, steps)
    for (r, c), w in zip(path, speed):
        r0, c0 = int(r), int(c)
        fr, fc = r - r0, c - c0
        kernel[r0, c0] += w * (1 - fr) * (1 - fc)
        kernel[r0 + 1, c0] += w * fr * (1 - fc)
        kernel[r0, c0 + 1] += w * (1 - fr) * fc
        kernel[r0 + 1, c0 + 1] += w * fr * fc
    return kernel / kernel.sum()


def gaussian_kernel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random anisotropic, rotated Gaussian kernel (σ between 0.5 and 3.5 px)."""
    s1, s2 = rng.uniform(0.5, 3.5, 2)
    theta = rng.uniform(0, np.pi)
    r = np.arange(size) - size // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    u = np.cos(theta) * xx + np.sin(theta) * yy
    v = -np.sin(theta) * xx + np.cos(theta) * yy
    kernel = np.exp(-0.5 * ((u / s1) ** 2 + (v / s2) ** 2))
    return kernel / kernel.sum()


def defocus_kernel(rng: np.random.Generator, size: int) -> np.ndarray:
    """Uniform disc (radius 1–6 px, edge anti-aliased by 4× supersampling), slightly
    softened by a Gaussian of σ 0.5–1 px: an out-of-focus microscope or camera."""
    radius = rng.uniform(1.0, min(6.0, size / 2 - 2))
    fine = (np.arange(size * 4) + 0.5) / 4 - size / 2
    yy, xx = np.meshgrid(fine, fine, indexing="ij")
    disc = (yy**2 + xx**2 <= radius**2).reshape(size, 4, size, 4).mean(axis=(1, 3))
    sigma = rng.uniform(0.5, 1.0)
    r = np.arange(size) - size // 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    otf = np.fft.rfft2(np.fft.ifftshift(disc)) * np.fft.rfft2(np.fft.ifftshift(np.outer(g, g)))
    kernel = np.clip(np.fft.fftshift(np.fft.irfft2(otf, s=disc.shape)), 0, None)
    return kernel / kernel.sum()


def random_kernel(
    rng: np.random.Generator, size: int, mix: tuple[float, float, float] = (0.7, 0.3, 0.0)
) -> np.ndarray:
    """Motion, Gaussian or defocus kernel with the shares ``mix``, ``size`` × ``size``, sum 1."""
    draw = rng.random()
    if draw < mix[0]:
        return motion_kernel(rng, size)
    return gaussian_kernel(rng, size) if draw < mix[0] + mix[1] else defocus_kernel(rng, size)


class _Decoder(nn.Module):
    def __init__(self, features: int = 16, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(features, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch(images: Sequence[np.ndarray], cfg: TrainConfig, rng: np.random.Generator):
    n = cfg.patch_size
    sharp = np.empty((cfg.batch_size, 1, n, n), dtype=np.float32)
    kernels = np.empty((cfg.batch_size, cfg.kernel_size, cfg.kernel_size), dtype=np.float32)
    for b in range(cfg.batch_size):
        image = images[rng.integers(len(images))]
        r, c = rng.integers(0, image.shape[0] - n + 1), rng.integers(0, image.shape[1] - n + 1)
        patch = image[r : r + n, c : c + n]
        patch = np.rot90(patch, rng.integers(4)) if rng.random() < 0.5 else patch[:, ::-1]
        sharp[b, 0] = patch
        kernels[b] = random_kernel(rng, cfg.kernel_size, cfg.kernel_mix)
    sigma = rng.uniform(0, cfg.noise_max, (cfg.batch_size, 1, 1, 1)).astype(np.float32)
    noise = rng.standard_normal(sharp.shape).astype(np.float32) * sigma
    return torch.from_numpy(sharp), torch.from_numpy(kernels), torch.from_numpy(noise)


def _poisson(blurred: torch.Tensor, cfg: TrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Shot noise on a ``poisson_fraction`` share of the patches, at a peak photon count
    drawn log-uniformly from ``photons`` (drawn from ``rng``: reproducible)."""
    if cfg.poisson_fraction <= 0:
        return blurred
    noisy = blurred.clone()
    for b in np.flatnonzero(rng.random(len(blurred)) < cfg.poisson_fraction):
        peak = float(np.exp(rng.uniform(*np.log(cfg.photons))))
        counts = rng.poisson(blurred[b].clamp_min(0).numpy() * peak)
        noisy[b] = torch.from_numpy(counts.astype(np.float32) / peak)
    return noisy


def _rl_features(features: torch.Tensor, kernels: torch.Tensor, iterations: int) -> torch.Tensor:
    """Features ``(B, C, Y, X)`` through RL, each patch with its own kernel ``(B, k, k)``, on
    the circular grid of the training pairs: the positive map, RL and the map undone, as
    at restoration time (:func:`cider.rl.richardson_lucy` with one PSF per patch)."""
    positive, low, scale = to_positive(features, FEATURE_OFFSET, 2)
    estimate = richardson_lucy(positive, kernels[:, None], iterations, boundary="periodic", ndim=2)
    return from_positive(estimate, low, scale, FEATURE_OFFSET)


def train_feature_extractor(
    images: Sequence[np.ndarray],
    config: TrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> tuple[FeatureExtractor, dict]:
    """Train the extractor on greyscale images in [0, 1]; return it and a training record.

    Parameters
    ----------
    images : sequence of np.ndarray
        2D float images in [0, 1], each at least ``patch_size`` on both sides.
    config : TrainConfig, optional
        Steps, batch, patch size, learning rate, noise level, seed, threads.
    log : callable
        Receives progress lines.

    Returns
    -------
    model, record
        The trained extractor (eval mode) and a dict with the settings, final loss,
        loss curve (every 50 steps) and seconds.
    """
    cfg = config or TrainConfig()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    extractor, decoder = FeatureExtractor(), _Decoder()
    log_nsr = nn.Parameter(torch.full((1, 16, 1, 1), math.log(1e-2)))
    params = [*extractor.parameters(), *decoder.parameters(), log_nsr]
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    n, margin = cfg.patch_size, 8
    curve, running, start = [], 0.0, time.perf_counter()
    for step in range(1, cfg.steps + 1):
        sharp, kernels, noise = _batch(images, cfg, rng)
        blur = BlurOperator(kernels[:, None], (n, n), "periodic")  # one kernel per patch
        blurred = _poisson(blur(sharp), cfg, rng) + noise
        features = extractor(blurred)
        if cfg.deconvolution == "rl":
            deconvolved = _rl_features(features, kernels, cfg.rl_iterations)
        else:
            wiener = blur.otf.conj() / (blur.otf.abs() ** 2 + log_nsr.exp())
            deconvolved = torch.fft.irfft2(torch.fft.rfft2(features) * wiener, s=(n, n))
        output = decoder(deconvolved)
        inner = (..., slice(margin, n - margin), slice(margin, n - margin))
        loss = (output[inner] - sharp[inner]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += float(loss.detach())
        if step % 50 == 0:
            curve.append(round(running / 50, 5))
            log(f"step {step}/{cfg.steps}  L1 {running / 50:.4f}  {time.perf_counter() - start:.0f} s")
            running = 0.0
    extractor.eval().requires_grad_(False)
    record = {
        "config": asdict(cfg),
        "final_l1": curve[-1] if curve else None,
        "l1_every_50_steps": curve,
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    return extractor, record
