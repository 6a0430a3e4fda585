"""End-to-end CiDeR restoration of one 2D image or 3D volume.

``restore(image, psf, config)`` runs the three stages below; the workflow calls them
one by one (features on a CPU/GPU job, the fit on a GPU job) and gets the same result.

1. :func:`prepare` – validate, subtract the background, scale intensities to [0, 1];
2. :func:`deconvolved_features` – deep features (or an ablation input), made positive,
   Richardson–Lucy with the PSF (``valid`` boundary, so the features already have the
   estimate's size ``image + psf − 1``), and the positivity map undone;
3. :func:`fit_generator` – fit the generator so that its output, re-blurred by the PSF
   (``valid``), matches the observation in SSIM, with Hessian and sparsity priors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .background import BackgroundConfig, wavelet_background
from .errors import CiderError, ImageError
from .features import extract_features, load_feature_extractor
from .generator import Generator, GeneratorConfig
from .losses import hessian_penalty, sparsity_penalty, ssim_loss
from .psf import validate_psf
from .rl import BlurOperator, from_positive, richardson_lucy, to_positive

__all__ = [
    "RestoreConfig",
    "Prepared",
    "Result",
    "restore",
    "prepare",
    "deconvolved_features",
    "fit_generator",
    "resolve_device",
    "validate_image",
    "to_data_units",
]

GENERATOR_INPUTS = ("features", "image_rl", "noise")


@dataclass(frozen=True)
class RestoreConfig:
    """Every setting of a CiDeR restoration.

    Attributes
    ----------
    iterations : int
        Generator fit iterations (paper: 3000).
    learning_rate : float
        NAdam learning rate.
    lr_milestones : tuple of float
        Fractions of ``iterations`` at which the learning rate is halved.
    weight_decay : float
        NAdam weight decay.
    ssim_weight, hessian_weight, sparsity_weight : float
        Loss weights α, λ, β (terms are means over pixels, see :mod:`cider.losses`).
    rl_iterations : int
        Richardson–Lucy iterations on the features.
    feature_offset : float
        Pedestal of the positivity map before RL (:func:`cider.rl.to_positive`).
    generator_input : {"features", "image_rl", "noise"}
        ``features``: CiDeR. ``image_rl``: RL on the image only (ablation without the
        feature extractor). ``noise``: fixed uniform noise (SelfDeblur-style ablation).
    background : BackgroundConfig
        Wavelet background removal (off by default; on for fluorescence data).
    normalize : bool
        Scale intensities to [0, 1] by their min and max (or ``intensity_range``).
    device : str
        ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    seed : int
        Seed of the generator's initial weights and of the noise input.
    early_stop_patience : int
        Stop when the loss has not improved by ``early_stop_tol`` (relative) for this many
        iterations; 0 disables early stopping.
    early_stop_tol : float
        Relative improvement that counts as progress.
    progress : bool
        Show a progress bar.
    feature_weights : str or None
        Path of feature-extractor weights; ``None`` uses the weights in the package.
    """

    iterations: int = 3000
    learning_rate: float = 0.005
    lr_milestones: tuple[float, ...] = (2 / 3, 0.77, 0.9)
    weight_decay: float = 1e-5
    ssim_weight: float = 1.0
    hessian_weight: float = 0.02
    sparsity_weight: float = 0.0
    rl_iterations: int = 20
    feature_offset: float = 0.01
    generator_input: str = "features"
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    normalize: bool = True
    device: str = "auto"
    seed: int = 0
    early_stop_patience: int = 0
    early_stop_tol: float = 1e-4
    progress: bool = False
    feature_weights: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "iterations": self.iterations >= 0,
            "learning_rate": self.learning_rate > 0,
            "rl_iterations": self.rl_iterations >= 0,
            "ssim_weight": self.ssim_weight >= 0,
            "hessian_weight": self.hessian_weight >= 0,
            "sparsity_weight": self.sparsity_weight >= 0,
            "feature_offset": self.feature_offset > 0,
            "early_stop_patience": self.early_stop_patience >= 0,
            "lr_milestones": all(0 < m < 1 for m in self.lr_milestones),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise CiderError(f"RestoreConfig: invalid value(s) {values}; see the RestoreConfig docstring")
        if self.generator_input not in GENERATOR_INPUTS:
            raise CiderError(
                f"RestoreConfig: generator_input must be one of {GENERATOR_INPUTS}, got {self.generator_input!r}"
            )

    def with_(self, **changes) -> RestoreConfig:
        """Copy with some fields changed (``background`` may be given as a dict)."""
        if isinstance(changes.get("background"), dict):
            changes["background"] = replace(self.background, **changes["background"])
        return replace(self, **changes)


@dataclass
class Prepared:
    """Observation ready for the method: scaled to [0, 1], background removed.

    ``image = observation * scale + low`` maps results back to data units.
    """

    observation: torch.Tensor
    psf: torch.Tensor
    low: float
    scale: float


@dataclass
class Result:
    """Output of :func:`restore`.

    Attributes
    ----------
    restored : np.ndarray
        Restored image, same shape as the input, in the input's intensity units
        (background removed when background removal was on), float32.
    loss_history : list of float
        Total loss per iteration.
    timings : dict
        Seconds per stage (``prepare``, ``features``, ``fit``, ``total``).
    device : str
        Device the computation ran on.
    iterations : int
        Iterations actually run (fewer than asked when early stopping triggered).
    """

    restored: np.ndarray
    loss_history: list[float]
    timings: dict[str, float]
    device: str
    iterations: int


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; other names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CiderError(f"device {name!r} requested but CUDA is not available; use device 'auto' or 'cpu'")
    return device


def validate_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check that ``image`` is a finite, non-empty 2D or 3D real array; return float64."""
    image = np.asarray(image)
    if image.size == 0:
        raise ImageError(f"{name}: the image is empty (shape {image.shape})")
    if image.ndim not in (2, 3):
        raise ImageError(
            f"{name}: expected a 2D (Y,X) or 3D (Z,Y,X) array, got {image.ndim}D shape {image.shape}; "
            "for channels or time points, declare the axes (e.g. 'CZYX') and restore each one"
        )
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ImageError(f"{name}: expected real numbers, got dtype {image.dtype}")
    image = image.astype(np.float64)
    bad = ~np.isfinite(image)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ImageError(
            f"{name}: {int(bad.sum())} NaN/infinite value(s), first at index {where}; fix the data"
        )
    return image


def prepare(
    image: np.ndarray,
    psf: np.ndarray,
    config: RestoreConfig,
    background: np.ndarray | None = None,
    intensity_range: tuple[float, float] | None = None,
    device: torch.device | None = None,
) -> Prepared:
    """Validate inputs, remove the background, scale to [0, 1].

    Parameters
    ----------
    image, psf : np.ndarray
        Observation and PSF (same number of axes).
    config : RestoreConfig
        Settings.
    background : np.ndarray, optional
        A background already estimated (the workflow estimates it once per image so that
        tiles agree); if given, it is subtracted and ``config.background`` is ignored.
    intensity_range : (low, high), optional
        Fixed scaling (the workflow uses one range for all tiles); default: min and max
        of the background-subtracted image.
    device : torch.device, optional
        Default: ``resolve_device(config.device)``.
    """
    image = validate_image(image)
    psf = validate_psf(psf, image.shape)
    device = device or resolve_device(config.device)
    if background is not None:
        image = image - np.asarray(background, dtype=np.float64)
    elif config.background.enabled:
        image = image - wavelet_background(image, config.background)
    if intensity_range is not None:
        low, high = map(float, intensity_range)
    elif config.normalize:
        low, high = float(image.min()), float(image.max())
    else:
        low, high = 0.0, 1.0
    scale = high - low if high > low else 1.0
    observation = torch.as_tensor((image - low) / scale, dtype=torch.float32, device=device)
    return Prepared(observation, torch.as_tensor(psf, dtype=torch.float32, device=device), low, scale)


def deconvolved_features(prepared: Prepared, config: RestoreConfig) -> torch.Tensor:
    """Generator input of shape ``(C, *(image + psf − 1))`` for ``config.generator_input``."""
    y, psf = prepared.observation, prepared.psf
    ndim = y.ndim
    object_shape = tuple(n + k - 1 for n, k in zip(y.shape, psf.shape))
    if config.generator_input == "noise":
        rng = torch.Generator().manual_seed(config.seed + 1)
        return (0.1 * torch.rand(16, *object_shape, generator=rng)).to(y.device)
    if config.generator_input == "image_rl":
        features = y[None]
    else:
        model = load_feature_extractor(config.feature_weights, device=y.device)
        features = extract_features(y, model)
    positive, low, scale = to_positive(features, config.feature_offset, ndim)
    deconvolved = richardson_lucy(positive, psf, config.rl_iterations, boundary="valid")
    return from_positive(deconvolved, low, scale, config.feature_offset)


def _lr_schedule(
    optimizer: torch.optim.Optimizer, config: RestoreConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    milestones = sorted({max(1, math.floor(m * config.iterations)) for m in config.lr_milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.5)


def fit_generator(
    features: torch.Tensor,
    prepared: Prepared,
    config: RestoreConfig,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Fit a freshly initialised generator to one observation.

    Parameters
    ----------
    features : torch.Tensor
        Generator input ``(C, *object_shape)`` from :func:`deconvolved_features`.
    prepared : Prepared
        Observation and PSF.
    config : RestoreConfig
        Loss weights, optimiser and schedule.
    callback : callable, optional
        Called as ``callback(iteration, loss)`` after every iteration.

    Returns
    -------
    estimate, losses
        The estimate of shape ``object_shape`` (values in [0, 1]) and the loss per
        iteration.
    """
    y, psf = prepared.observation, prepared.psf
    ndim = y.ndim
    torch.manual_seed(config.seed)
    generator = Generator(ndim, GeneratorConfig(in_channels=features.shape[0])).to(y.device)
    blur = BlurOperator(psf, y.shape, boundary="valid")
    optimizer = torch.optim.NAdam(
        generator.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = _lr_schedule(optimizer, config)
    net_input, target = features[None], y[None, None]
    losses: list[float] = []
    best, since_best = math.inf, 0
    for iteration in range(config.iterations):
        optimizer.zero_grad(set_to_none=True)
        estimate = generator(net_input)
        loss = config.ssim_weight * ssim_loss(blur(estimate), target)
        if config.hessian_weight:
            loss = loss + config.hessian_weight * hessian_penalty(estimate)
        if config.sparsity_weight:
            loss = loss + config.sparsity_weight * sparsity_penalty(estimate)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(iteration, losses[-1])
        if config.early_stop_patience:
            if losses[-1] < best * (1 - config.early_stop_tol):
                best, since_best = losses[-1], 0
            else:
                since_best += 1
                if since_best >= config.early_stop_patience:
                    break
    with torch.no_grad():
        estimate = generator(net_input)[0, 0]
    return estimate, losses


def restore(
    image: np.ndarray,
    psf: np.ndarray,
    config: RestoreConfig | None = None,
    *,
    background: np.ndarray | None = None,
    intensity_range: tuple[float, float] | None = None,
) -> Result:
    """Restore one 2D image or 3D volume with CiDeR.

    Parameters
    ----------
    image : np.ndarray
        Observation, (Y, X) or (Z, Y, X).
    psf : np.ndarray
        PSF with the same number of axes, applied by convolution.
    config : RestoreConfig, optional
        Settings; default ``RestoreConfig()`` (3000 iterations, paper schedule).
    background, intensity_range
        See :func:`prepare`.

    Returns
    -------
    Result
        Restored array (input shape), loss history, timings and device.

    Examples
    --------
    >>> import numpy as np, cider
    >>> image = np.random.default_rng(0).random((64, 64))
    >>> result = cider.restore(image, cider.gaussian_psf(1.5), cider.RestoreConfig(iterations=5))
    >>> result.restored.shape
    (64, 64)
    """
    config = config or RestoreConfig()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    prepared = prepare(image, psf, config, background, intensity_range)
    device = prepared.observation.device
    timings["prepare"] = time.perf_counter() - start
    features = deconvolved_features(prepared, config)
    timings["features"] = time.perf_counter() - start - timings["prepare"]
    with _progress_bar(config) as callback:
        estimate, losses = fit_generator(features, prepared, config, callback)
    timings["fit"] = time.perf_counter() - start - timings["prepare"] - timings["features"]
    restored = to_data_units(estimate, prepared)
    timings["total"] = time.perf_counter() - start
    return Result(restored, losses, timings, str(device), len(losses))


def to_data_units(estimate: torch.Tensor, prepared: Prepared) -> np.ndarray:
    """Crop a fitted estimate to the image's field of view and scale it back (float32)."""
    restored = crop_to_image(estimate, prepared.psf.shape).cpu().numpy().astype(np.float64)
    return (restored * prepared.scale + prepared.low).astype(np.float32)


def crop_to_image(estimate: torch.Tensor, psf_shape: tuple[int, ...]) -> torch.Tensor:
    """Crop an estimate of shape ``image + psf − 1`` to the image's own field of view."""
    index = tuple(slice(k // 2, n - k // 2) for n, k in zip(estimate.shape[-len(psf_shape) :], psf_shape))
    return estimate[(..., *index)]


class _progress_bar:
    """Context manager giving a tqdm-updating callback, or None when progress is off."""

    def __init__(self, config: RestoreConfig):
        self.config = config
        self.bar = None

    def __enter__(self) -> Callable[[int, float], None] | None:
        if not self.config.progress:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.config.iterations, desc="fit", unit="it")

        def update(iteration: int, loss: float) -> None:
            self.bar.update(1)
            if iteration % 20 == 0:
                self.bar.set_postfix(loss=f"{loss:.4f}")

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
