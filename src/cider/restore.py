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
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch

from .background import BackgroundConfig, estimate_background
from .errors import CiderError, ImageError
from .features import extract_features, load_feature_extractor, weights_digest
from .fitting import Fit, fit_generator, fit_generators, fit_rl, noise_aware_weights
from .generator import OUTPUTS, Strides, voxel_strides
from .noise import NoiseModel, estimate_noise
from .psf import validate_psf
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

METHODS = ("cider", "rl")
GENERATOR_INPUTS = ("features", "image_rl", "features_image", "noise")
STOP_RULES = ("discrepancy", "none")
PRECISIONS = ("float32", "bfloat16")
SSIM_WINDOWS = ("voxel", "physical")
GENERATOR_STRIDES = ("isotropic", "voxel")
HESSIAN_DOMAINS = ("intensity", "stabilised")
KEEP_BEST_BY = ("loss", "block")
# Settings for fluorescence (bright objects on a dark background), measured in
# bench/README.md ("The data term per modality", "Variance-stabilised Hessian", "keep_best
# judged on the block mean", "As the pipeline runs it": the retrained extractor, +0.29 dB
# over the shipped one on the 3D cases); the defaults suit bright-field and natural
# images. Use as ``RestoreConfig(**FLUORESCENCE)``.
FLUORESCENCE = {
    "data_weight": 100.0,
    "hessian_domain": "stabilised",
    "keep_best_by": "block",
    "feature_weights": "features_rl10.pt",
}
# An image's mean over its maximum: below FLUORESCENCE_LIKE it looks like fluorescence (a
# dark background; 0.02-0.31 on the benchmark volumes, flowdec, RedLionfish and the
# deconwolf DAPI image), above BRIGHTFIELD_LIKE like bright field (0.74-0.88 on the IFCB
# images and the synthetic plankton scene).
FLUORESCENCE_LIKE = 0.35
BRIGHTFIELD_LIKE = 0.6
# A fit with a data term that ends above this χ² was not explained by the model at the
# noise level (the synthetic fluorescence cases end at 0.6-1.0, flowdec bars, whose PSF
# does not match its data, at 21-38): the data term then fits the mismatch.
CHI2_MISFIT = 4.0


def looks_like(mean: float, maximum: float) -> str | None:
    """``"fluorescence"``, ``"brightfield"`` or ``None`` (can't tell) from an image's mean
    and maximum (after background removal, if any): the check behind the hints that the
    settings may not suit the data (``FLUORESCENCE`` or the defaults)."""
    ratio = mean / maximum if maximum > 0 else 0.0
    if ratio < FLUORESCENCE_LIKE:
        return "fluorescence"
    return "brightfield" if ratio > BRIGHTFIELD_LIKE else None


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
        ``hessian_weight`` is the prior's weight on noise-free data; see
        ``hessian_noise_weight``.
    hessian_noise_weight : float
        The Hessian weight grows with the noise: ``λ = hessian_weight +
        hessian_noise_weight · σ²``, with σ the noise level (std at the mean signal, in
        units of the intensity scale). SSIM does not know the noise, so a fixed λ is
        either too weak for noisy microscopy or too strong for clean data; ``σ²`` is the
        scaling of a MAP prior weight against a noise-blind data term.
    hessian_domain : {"intensity", "stabilised"}
        What the Hessian prior measures: the estimate itself (``intensity``), or its
        variance-stabilised form (``stabilised``, :func:`cider.losses.variance_stabilised`:
        the generalised Anscombe transform of the estimated noise model, equal to the
        intensity to first order at the mean signal). Under shot noise a bright bead is
        known far better than the dim background, yet an intensity-scale L1 Hessian
        charges its peak in proportion to its amplitude and flattens it; on the
        stabilised scale, where the noise is uniform, it costs ∝ √amplitude. For
        fluorescence (bright objects on a dark background); see bench/README.md,
        "Variance-stabilised Hessian". Without shot noise (gain 0) both are the same.
    ssim_noise_factor : float
        SSIM's contrast constant is raised to ``k2 = max(0.03, ssim_noise_factor · σ)``
        so that SSIM cannot reward copying the noise's local variance (flat bright
        backgrounds otherwise come out textured); structure at or below the noise level
        is left to the noise-weighted data term.
    ssim_window : {"voxel", "physical"}
        SSIM's Gaussian window (σ 1.5, 11 px): the same number of voxels on every axis
        (``"voxel"``), or, with a ``voxel_size``, the same physical width on every axis
        (``"physical"``: a z step 3× the xy pixel gets σ 0.5 planes). Voxel by default:
        microscopes sample each axis to match the PSF there (the z step follows the
        longer axial PSF), so a window of one size in voxels spans the same number of
        resolution elements on every axis; the physical window measured 0.04–0.16 dB
        worse on z-step-3× volumes (bench/README.md, "Anisotropic voxels"). The Hessian
        prior always uses the voxel size.
    generator_strides : {"isotropic", "voxel"}
        How the generator downsamples a volume with a ``voxel_size``: by 2 on every axis
        at each of its four levels (``"isotropic"``, the paper's network), or (``"voxel"``)
        only along axes whose spacing is under twice the finest at that level
        (:func:`cider.generator.voxel_strides`): a z step 2–3× the xy pixel keeps every
        plane at the first level, so the coarsest level has 8× fewer planes, not 16×.
        Costs 1.07–1.2× the activations of a tile (``cider.memory`` counts it). Measured
        on the CPU at 300 it. (bench/README.md, "The generator's strides in z"): +0.16 dB
        on gauss3d_low (two seeds), level on lightsheet3d_low and widefield3d_low; not yet
        the default.
    data_weight : float
        Weight of the noise-weighted L2 data term ``σ² · mean((Ax − y)² / var(Ax))``
        (the χ² per pixel times the mean noise variance σ², so that the term is an
        ordinary mean squared error for uniform noise, on the same scale as SSIM, and
        weighs dim pixels by their lower Poisson noise). It sees dim structure that SSIM
        ignores and ties the estimate's intensities to the data's.
    output : {"softplus", "sigmoid"}
        Generator output: ``softplus`` (positive, unbounded) or ``sigmoid`` (paper).
    stop : {"discrepancy", "none"}
        ``discrepancy``: stop once χ² ≤ ``discrepancy`` (checked every ``log_every``
        iterations): the re-blurred estimate is then as close to the data as the noise
        allows, and further iterations would fit the noise. ``none``: run all iterations.
    discrepancy : float
        χ² target of the discrepancy stop (1 = the estimated noise level).
    preserve_flux : bool
        Rescale the final estimate so that its re-blurred sum equals the observed sum on
        the field's interior (data at least a PSF radius from the edge, which only object
        voxels inside the field reach; the whole field when it is too small). Skipped
        when the observed sum is not positive.
    keep_best : bool
        Return the estimate with the lowest loss among those logged (every ``log_every``
        iterations), not the last one: with the unbounded softplus output the loss can
        spike late in the fit and not recover (Levin im1_k1 on CPU: 32.3 dB at 500
        iterations, 30.6 dB at 1000). Off when ``average`` is on.
    keep_best_by : str
        How ``keep_best`` judges a logged estimate: ``loss``, by its own loss; ``block``,
        by the larger of its own loss and the mean loss of the ``log_every`` iterations
        that end at it. While the loss jitters around a plateau, its lowest single value
        is often an early, lucky point (fluo2d_low, 500 it.: the it.-150 estimate, 26.12
        dB, where the last scores 26.23), which the block mean is less swayed by; the
        larger of the two also passes over the first iteration of a spike, whose block
        mean is still low (Levin im1_k1, CPU: the mean alone returned it. 590, 32.68 dB,
        own loss and ``block`` it. 570, 33.13 dB). ``block`` is part of ``FLUORESCENCE``:
        with the data term a dim bead field's loss (an earlier draw of it) dipped once at
        it. 370 of 1000, and ``loss`` returned that estimate, its bead peak 0.88 ×
        RL(100)'s, where the settled end has 1.31 × (bench/README.md, "keep_best judged
        on the block mean").
    average : float
        Decay of an exponential moving average of the generator's output over the
        iterations (0: off, the last output is the estimate). Averaging cancels the
        iteration-to-iteration fluctuations with which a generator follows the noise.
    log_every : int
        Iterations between loss read-outs, callbacks and stop checks (each read-out is a
        device synchronisation).
    method : {"cider", "rl"}
        ``cider``: the generator fit. ``rl``: plain Richardson–Lucy of the observation
        for ``rl_iterations`` (the baseline, no features or generator: the generator
        settings are unused), with the same object grid, flux renormalisation and checks
        (:func:`cider.fitting.fit_rl`).
    rl_iterations : int
        Richardson–Lucy iterations on the features (with ``method="rl"``: on the image).
    feature_offset : float
        Pedestal of the positivity map before RL (:func:`cider.rl.to_positive`).
    generator_input : {"features", "image_rl", "features_image", "noise"}
        ``features``: CiDeR. ``image_rl``: RL on the image only (ablation without the
        feature extractor). ``features_image``: the image as one more channel next to the
        features, all deconvolved by RL. ``noise``: fixed uniform noise (SelfDeblur-style
        ablation).
    background : BackgroundConfig
        Background removal (off by default; on for fluorescence data): a smooth wavelet
        background, or one flat level per image (``method="flat"``, for faint spots on
        a uniform background, which the wavelet estimate takes in).
    normalize : bool
        Divide intensities by the maximum of the (background-subtracted) data, or by the
        ``scale`` given to :func:`prepare`; zero stays zero.
    device : str
        ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision : {"float32", "bfloat16"}
        Arithmetic of the generator's forward and backward pass. ``bfloat16`` runs the
        generator body on bf16 copies of the float32 weights (gradients flow back through
        the cast; ``torch.autocast`` is not used because it does not reach convolutions
        under ``vmap``); the 1×1 output layer, the blur, the losses and the optimiser stay
        float32. It cuts activation memory (a 64×192² tile on an H200: 21.8 → 13.6 GiB
        peak) at ±0.01 dB; speed changed by 0.84–1.14× there, so it is not the default
        (``bench/results/throughput_gpu.md``).
    compile : bool
        Run the generator's forward (and so its backward) through ``torch.compile``
        (inductor; one graph without breaks), aimed at the batch norm, LeakyReLU and
        padding that take about 40 % of a large 3D tile's GPU time. Every process compiles
        once per generator kind and input shape (a batch whose size changes when members
        stop compiles once more), so it pays on long fits of many same-shape tiles. The
        result equals the uncompiled fit up to float rounding (which the fit amplifies, as
        between two GPUs). On a CPU (2 cores), one batch of 8 tiles of 64²: 160 s of
        compilation, then 1.2× the speed of the uncompiled batch
        (``bench/results/throughput_compile_cpu.md``). Not yet timed on a GPU. Off by
        default. A fit first compiles a small probe (:func:`cider.fitting.check_compile`,
        seconds) and stops with a message naming this setting where the node cannot
        build code (no C++ compiler on a CPU, no Triton on CUDA).
    deterministic : bool
        On CUDA, use deterministic kernels only (``torch.use_deterministic_algorithms``,
        no cuDNN autotuning): bit-identical reruns on the same GPU and software, at some
        speed. Off: cuDNN picks the fastest kernels (``cudnn.benchmark``), and reruns may
        differ by float rounding (the fit amplifies it to ~1e-3 relative; see
        ``tests/test_batched_fit.py``). CPU runs are deterministic either way.
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
    hessian_noise_weight: float = 60.0
    ssim_noise_factor: float = 5.0
    ssim_window: str = "voxel"
    generator_strides: str = "isotropic"
    hessian_domain: str = "intensity"
    sparsity_weight: float = 0.0
    data_weight: float = 0.0
    output: str = "softplus"
    stop: str = "none"
    discrepancy: float = 1.0
    preserve_flux: bool = True
    keep_best: bool = True
    keep_best_by: str = "loss"
    average: float = 0.0
    log_every: int = 10
    method: str = "cider"
    rl_iterations: int = 20
    feature_offset: float = 0.01
    generator_input: str = "features"
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    normalize: bool = True
    device: str = "auto"
    precision: str = "float32"
    compile: bool = False
    deterministic: bool = False
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
            "hessian_noise_weight": self.hessian_noise_weight >= 0,
            "ssim_noise_factor": self.ssim_noise_factor >= 0,
            "sparsity_weight": self.sparsity_weight >= 0,
            "data_weight": self.data_weight >= 0,
            "discrepancy": self.discrepancy > 0,
            "log_every": self.log_every >= 1,
            "average": 0 <= self.average < 1,
            "feature_offset": self.feature_offset > 0,
            "early_stop_patience": self.early_stop_patience >= 0,
            "lr_milestones": all(0 < m < 1 for m in self.lr_milestones),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise CiderError(f"RestoreConfig: invalid value(s) {values}; see the RestoreConfig docstring")
        for name, allowed in (
            ("method", METHODS),
            ("generator_input", GENERATOR_INPUTS),
            ("stop", STOP_RULES),
            ("output", OUTPUTS),
            ("precision", PRECISIONS),
            ("ssim_window", SSIM_WINDOWS),
            ("generator_strides", GENERATOR_STRIDES),
            ("hessian_domain", HESSIAN_DOMAINS),
            ("keep_best_by", KEEP_BEST_BY),
        ):
            if getattr(self, name) not in allowed:
                raise CiderError(
                    f"RestoreConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

    @property
    def needs_feature_range(self) -> bool:
        """Whether RL runs on a generator input through the positivity map, which needs
        the whole image's range (:func:`feature_range`): not for ``generator_input="noise"``
        nor for ``method="rl"``."""
        return self.method == "cider" and self.generator_input != "noise"

    def strides(self, voxel_size: Sequence[float] | None) -> Strides:
        """The generator's per-level strides for data of this voxel size
        (``GeneratorConfig.strides``; empty: 2 on every axis)."""
        if self.generator_strides == "voxel" and voxel_size is not None:
            return voxel_strides(voxel_size)
        return ()

    def with_(self, **changes) -> RestoreConfig:
        """Copy with some fields changed (``background`` may be given as a dict)."""
        if isinstance(changes.get("background"), dict):
            changes["background"] = replace(self.background, **changes["background"])
        return replace(self, **changes)


@dataclass
class Prepared:
    """Observation ready for the method: background removed, divided by ``scale``.

    ``image = observation * scale`` maps results back to data units; ``noise`` is the
    noise model of ``observation`` (already scaled), ``mean_signal`` the mean signal
    (same units; the whole image's in the workflow, so all its tiles agree, ≥ 0) and
    ``noise_level`` the noise's standard deviation there, which sets the noise-aware
    loss weights and the variance-stabilised Hessian's scale. ``saturated`` marks the
    pixels at a camera's full scale: their true value is only known to be at least the
    data there, so the fits treat them as lower bounds (censored), not as measurements.
    ``background`` is the background removed (a map or a level, not the offset), which
    plain RL keeps in its model (:func:`cider.fitting.fit_rl`).
    """

    observation: torch.Tensor
    psf: torch.Tensor
    scale: float
    noise: NoiseModel
    noise_level: float
    voxel_size: tuple[float, ...] | None = None
    mean_signal: float = 0.0
    saturated: torch.Tensor | None = None  # bool, observation shape: censored pixels (≥ the data there)
    background_level: float | None = None  # a flat background subtracted (data units, above the offset)
    background: torch.Tensor | None = None  # the background subtracted (observation's shape and units)


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
    """

    restored: np.ndarray
    loss_history: list[float]
    timings: dict[str, float]
    device: str
    iterations: int
    chi2: float = math.nan
    stopped: str = "iterations"
    background_level: float | None = None


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
