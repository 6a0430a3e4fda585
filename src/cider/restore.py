"""End-to-end CiDeR restoration of one 2D image or 3D volume.

``restore(image, psf, config)`` runs the three stages below; the workflow calls them
one by one (features on a CPU/GPU job, the fit on a GPU job) and gets the same result.

1. :func:`prepare` – validate, subtract the background, divide by one intensity scale
   (zero stays zero), estimate the noise model;
2. :func:`deconvolved_features` – deep features (or an ablation input), made positive,
   Richardson–Lucy with the PSF (``valid`` boundary, so the features already have the
   estimate's size ``image + psf − 1``), and the positivity map undone;
3. :func:`fit_generator` – fit the generator so that its output, re-blurred by the PSF
   (``valid``), matches the observation in SSIM (its contrast constant raised to the
   noise level), with a Hessian prior whose weight grows with the noise and an optional
   sparsity prior; optionally a noise-weighted L2 data term and a discrepancy stop; then
   rescale the estimate to keep the observed flux.

Intensities: the output is in the input's units. Zero stays zero (the data are divided by
one positive scale, never shifted), so a restored spot's integrated intensity is
comparable with the raw data's (after background removal, when it is on). The estimate is
non-negative (softplus output) and is not bounded by the brightest observed value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .background import estimate_background
from .errors import CiderError, ImageError
from .features import extract_features, load_feature_extractor, weights_digest
from .fitting import Fit, Prepared, fit_generator, fit_generators, fit_rl, noise_aware_weights
from .noise import NoiseModel, estimate_noise
from .psf import validate_psf
from .restore_config import CHI2_MISFIT, FLUORESCENCE, RestoreConfig, looks_like
from .rl import from_positive, richardson_lucy, to_positive

__all__ = [
    "FLUORESCENCE",
    "RestoreConfig",
    "Prepared",
    "Fit",
    "Result",
    "restore",
    "prepare",
    "deconvolved_features",
    "fit_generator",
    "fit_generators",
    "fit_rl",
    "noise_aware_weights",
    "feature_weights_digest",
    "resolve_device",
    "validate_image",
    "to_data_units",
    "intensity_scale",
    "looks_like",
    "CHI2_MISFIT",
    "full_scale",
]


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
    chi2 : float
        Final data misfit per pixel in units of the estimated noise variance.
    stopped : str
        Why the fit ended: ``discrepancy``, ``plateau``, ``iterations`` or ``flat``.
    timings : dict
        Seconds per stage (``prepare``, ``features``, ``fit``, ``total``).
    device : str
        Device the computation ran on.
    iterations : int
        Iterations actually run (fewer than asked when early stopping triggered).
    background_level : float or None
        The flat background level subtracted (``background.method="flat"`` or a level
        given), in the input's units above the offset; None for none or a background map.
    polish_loss_history : list of float
        Total loss per step of the polish over the voxels (``polish_iterations``; empty
        when off); ``chi2`` is then the polished estimate's.
    """

    restored: np.ndarray
    loss_history: list[float]
    timings: dict[str, float]
    device: str
    iterations: int
    chi2: float = math.nan
    stopped: str = "iterations"
    background_level: float | None = None
    polish_loss_history: list[float] = field(default_factory=list)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; other names are checked.

    Raises
    ------
    CiderError
        For a name torch does not know, or a CUDA device that is not usable (saying
        which torch build is installed), so a GPU job never runs silently on the CPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CiderError(
            f"device {name!r} is not a device name ({err}); use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise CiderError(
                f"device {name!r} requested but CUDA is not usable here (torch {torch.__version__}, "
                f"{build}, {torch.cuda.device_count()} device(s) visible); install the CUDA build "
                "of torch on the GPU nodes, check the job got a GPU, or use device 'auto'/'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CiderError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise CiderError(f"device {name!r}: only 'auto', 'cpu', 'cuda' and 'cuda:N' are supported")
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
    background: np.ndarray | float | None = None,
    scale: float | None = None,
    noise: NoiseModel | None = None,
    device: torch.device | None = None,
    mean_signal: float | None = None,
    voxel_size: Sequence[float] | None = None,
    saturation: float | None = None,
    offset: float = 0.0,
) -> Prepared:
    """Validate inputs, remove the offset and background, divide by one intensity scale.

    Parameters
    ----------
    image, psf : np.ndarray
        Observation and PSF (same number of axes).
    config : RestoreConfig
        Settings.
    background : np.ndarray or float, optional
        A background already estimated, an array like the image or a flat level (the
        workflow estimates it once per image so that tiles agree); if given, it is
        subtracted and ``config.background`` is ignored.
    scale : float, optional
        Data units per unit of the method (the workflow uses one scale for all tiles of
        an image); default: the maximum of the background-subtracted image when
        ``config.normalize``, else 1. Zero is never shifted.
    noise : NoiseModel, optional
        Noise model in data units (the workflow estimates it once per image); default:
        :func:`cider.noise.estimate_noise` of the background-subtracted image.
    mean_signal : float, optional
        Mean signal (data units) at which the noise level is taken (the workflow passes
        the whole image's, so that all tiles get the same loss weights); default: the
        image's mean.
    voxel_size : sequence of float, optional
        Sampling per axis (Z, Y, X or Y, X). Anisotropic voxels weight the Hessian prior
        per axis (:func:`cider.losses.hessian_penalty`), and with ``ssim_window
        "physical"`` shape the SSIM window (:func:`cider.losses.ssim_windows`). Default:
        isotropic.
    saturation : float, optional
        The camera's full scale in the image's units (e.g. :func:`full_scale`): pixels at
        or above it are saturated, their true value unknown but at least the data. They
        are censored in the fit (a lower bound, see :class:`Prepared`). Default: none.
    offset : float, optional
        A camera offset (dark level) in the image's units, subtracted first: the
        background (given or estimated), the noise model and the scale are of the data
        above it. The saturation level is of the raw values. Default: 0.
    device : torch.device, optional
        Default: ``resolve_device(config.device)``.
    """
    image = validate_image(image)
    saturated = image >= saturation if saturation is not None else None
    psf = validate_psf(psf, image.shape)
    if voxel_size is not None:
        voxel_size = tuple(float(v) for v in voxel_size)
        if len(voxel_size) != image.ndim or min(voxel_size) <= 0:
            raise ImageError(
                f"voxel_size {voxel_size}: give {image.ndim} positive values, one per image axis"
            )
    device = device or resolve_device(config.device)
    if offset:
        image = image - offset
    if background is not None:
        image = image - np.asarray(background, dtype=np.float64)
    elif config.background.enabled:
        background = estimate_background(image, config.background, psf)
        image = image - background
    level = float(background) if background is not None and np.ndim(background) == 0 else None
    if scale is None:
        scale = intensity_scale(image) if config.normalize else 1.0
    scale = float(scale) if scale > 0 else 1.0
    noise = (noise or estimate_noise(image)).scaled(1 / scale)
    mean_signal = float(image.mean()) if mean_signal is None else float(mean_signal)
    noise_level = math.sqrt(float(noise.variance(np.array(mean_signal / scale))))
    observation = torch.as_tensor(image / scale, dtype=torch.float32, device=device)
    removed = None
    if background is not None:
        removed = np.asarray(background, dtype=np.float64) / scale
        removed = torch.as_tensor(removed, dtype=torch.float32, device=device).expand_as(observation)
    psf_t = torch.as_tensor(psf, dtype=torch.float32, device=device)
    censored = (
        torch.as_tensor(saturated, device=device) if saturated is not None and saturated.any() else None
    )
    return Prepared(
        observation,
        psf_t,
        scale,
        noise,
        noise_level,
        voxel_size,
        max(mean_signal / scale, 0.0),
        censored,
        level,
        removed,
    )


FULL_SCALE_BITS = (8, 10, 12, 14, 16)  # camera bit depths: full scale 2^bits − 1


def full_scale(dtype: np.dtype, peak: float, count: int) -> float | None:
    """The camera full scale an integer image reaches, or None: its type's maximum (any
    pixel), or 2^10/12/14 − 1 in a wider type (two or more pixels at it). ``peak``: the
    image's maximum, ``count``: pixels at it. Pixels there are saturated."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        return None
    type_max = float(np.iinfo(dtype).max)
    scales = {float(2**bits - 1) for bits in FULL_SCALE_BITS if 2**bits - 1 <= type_max}
    if peak == type_max or (peak in scales and count >= 2):
        return float(peak)
    return None


def intensity_scale(image: np.ndarray) -> float:
    """Data units per unit of the method: the maximum, or 1 when nothing is positive."""
    high = float(np.max(image))
    return high if high > 0 else 1.0


def raw_features(observation: torch.Tensor, config: RestoreConfig) -> torch.Tensor:
    """What RL deconvolves, ``(C, *shape)``: the deep features, the image (``image_rl``) or
    the image followed by the features (``features_image``)."""
    if config.generator_input == "image_rl":
        return observation[None]
    features = extract_features(
        observation, _feature_extractor(config.feature_weights, str(observation.device))
    )
    if config.generator_input == "features_image":
        return torch.cat([observation[None], features])
    return features


def feature_weights_digest(config: RestoreConfig) -> str | None:
    """SHA-256 of the feature-extractor weights that ``config`` restores with, or ``None``
    when it uses no features (``image_rl``, ``noise``, ``method="rl"``). ``feature_weights:
    None`` names the package's default file, whose content can change between versions:
    the digest is what tells results apart."""
    if config.method != "cider" or config.generator_input not in ("features", "features_image"):
        return None
    return weights_digest(config.feature_weights)


@lru_cache(maxsize=4)
def _feature_extractor(weights: str | None, device: str):
    """The extractor, loaded once per process (a fit job prepares every tile of its batch,
    and :func:`feature_range` goes through a volume slab by slab). Frozen, so sharing is safe."""
    return load_feature_extractor(weights, device=device)


def feature_range(
    observation: torch.Tensor, config: RestoreConfig, planes: int = 16
) -> tuple[list[float], list[float]]:
    """Per-channel minimum and maximum of :func:`raw_features` (the whole image's, once).

    Volumes are processed ``planes`` Z planes at a time (the extractor is 2D), so memory
    stays at a slab's features, not the volume's 16 feature maps.
    """
    slabs = [observation] if observation.ndim == 2 else torch.split(observation, planes)
    lows, highs = [], []
    for slab in slabs:
        features = raw_features(slab, config)
        dims = tuple(range(1, features.ndim))
        lows.append(features.amin(dim=dims))
        highs.append(features.amax(dim=dims))
    return torch.stack(lows).amin(0).tolist(), torch.stack(highs).amax(0).tolist()


def deconvolved_features(
    prepared: Prepared,
    config: RestoreConfig,
    value_range: tuple[list[float], list[float]] | None = None,
) -> torch.Tensor:
    """Generator input of shape ``(C, *(image + psf − 1))`` for ``config.generator_input``.

    ``value_range``: the whole image's :func:`feature_range` when ``prepared`` is one tile,
    so that every tile's features go through the same positivity map before RL.
    """
    y, psf = prepared.observation, prepared.psf
    ndim = y.ndim
    object_shape = tuple(n + k - 1 for n, k in zip(y.shape, psf.shape))
    if config.generator_input == "noise":
        rng = torch.Generator().manual_seed(config.seed + 1)
        return (0.1 * torch.rand(16, *object_shape, generator=rng)).to(y.device)
    features = raw_features(y, config)
    positive, low, scale = to_positive(features, config.feature_offset, ndim, value_range)
    deconvolved = richardson_lucy(
        positive,
        psf,
        config.rl_iterations,
        boundary="valid",
        saturated=_saturated_channels(prepared, config, len(features)),
    )
    return from_positive(deconvolved, low, scale, config.feature_offset)


def _saturated_channels(prepared: Prepared, config: RestoreConfig, channels: int) -> torch.Tensor | None:
    """Saturated pixels of the channels RL deconvolves that are the image itself (the
    ``image_rl`` input, the first channel of ``features_image``): lower bounds there too,
    as in the fit, since the positivity map is increasing. The learned features are not
    monotone in the intensity, so their channels are taken as they are."""
    if prepared.saturated is None or config.generator_input not in ("image_rl", "features_image"):
        return None
    mask = torch.zeros(
        (channels, *prepared.saturated.shape), dtype=torch.bool, device=prepared.saturated.device
    )
    mask[0] = prepared.saturated
    return mask


def restore(
    image: np.ndarray,
    psf: np.ndarray,
    config: RestoreConfig | None = None,
    *,
    background: np.ndarray | float | None = None,
    scale: float | None = None,
    voxel_size: Sequence[float] | None = None,
    saturation: float | None = None,
    offset: float = 0.0,
) -> Result:
    """Restore one 2D image or 3D volume with CiDeR (or plain RL: ``config.method``).

    Parameters
    ----------
    image : np.ndarray
        Observation, (Y, X) or (Z, Y, X).
    psf : np.ndarray
        PSF with the same number of axes, applied by convolution.
    config : RestoreConfig, optional
        Settings; default ``RestoreConfig()`` (3000 iterations, paper schedule).
    background, scale, voxel_size, saturation, offset
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
    prepared = prepare(
        image, psf, config, background, scale, voxel_size=voxel_size, saturation=saturation, offset=offset
    )
    device = prepared.observation.device
    timings["prepare"] = time.perf_counter() - start
    if config.method == "rl":
        timings["features"] = 0.0
        fit = fit_rl(prepared, config)
    else:
        features = deconvolved_features(prepared, config)
        timings["features"] = time.perf_counter() - start - timings["prepare"]
        with _progress_bar(config) as callback:
            fit = fit_generator(features, prepared, config, callback)
    timings["fit"] = time.perf_counter() - start - timings["prepare"] - timings["features"]
    restored = to_data_units(fit.estimate, prepared)
    timings["total"] = time.perf_counter() - start
    return Result(
        restored,
        fit.losses,
        timings,
        str(device),
        fit.iterations,
        fit.chi2,
        fit.stopped,
        prepared.background_level,
        fit.polish_losses,
    )


def to_data_units(estimate: torch.Tensor, prepared: Prepared) -> np.ndarray:
    """Crop a fitted estimate to the image's field of view and scale it back (float32)."""
    restored = crop_to_image(estimate, prepared.psf.shape).cpu().numpy().astype(np.float64)
    return (restored * prepared.scale).astype(np.float32)


def crop_to_image(estimate: torch.Tensor, psf_shape: tuple[int, ...]) -> torch.Tensor:
    """Crop an estimate of shape ``image + psf − 1`` to the image's own field of view."""
    index = tuple(slice(k // 2, n - k // 2) for n, k in zip(estimate.shape[-len(psf_shape) :], psf_shape))
    return estimate[(..., *index)]


class _progress_bar:
    """Context manager giving a tqdm-updating callback, or None when progress is off."""

    def __init__(self, config: RestoreConfig):
        self.config = config
        self.bar = None

    def __enter__(self) -> Callable[[int, float, torch.Tensor], None] | None:
        if not self.config.progress:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.config.iterations, desc="fit", unit="it")

        def update(iteration: int, loss: float, estimate: torch.Tensor) -> None:
            self.bar.update(iteration + 1 - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}")

        return update

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
