"""Every setting of a restoration: :class:`RestoreConfig`, its allowed values, the
``FLUORESCENCE`` preset and the check behind the hints that the settings may not suit the
data (:func:`looks_like`).

Plain values only (no tensors, no files read): :mod:`cider.fitting`, :mod:`cider.restore`
and the entry points read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .background import BackgroundConfig
from .errors import CiderError
from .generator import OUTPUTS, Strides, voxel_strides

__all__ = [
    "FLUORESCENCE",
    "RestoreConfig",
    "looks_like",
    "CHI2_MISFIT",
]

METHODS = ("cider", "rl")
GENERATOR_INPUTS = ("features", "image_rl", "features_image", "noise")
STOP_RULES = ("discrepancy", "none")
PRECISIONS = ("float32", "bfloat16")
SSIM_WINDOWS = ("voxel", "physical")
GENERATOR_STRIDES = ("isotropic", "voxel")
HESSIAN_DOMAINS = ("intensity", "stabilised")
HESSIAN_NORMS = ("entries", "frobenius")  # cider.losses.hessian_penalty's norms
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
    hessian_norm : {"entries", "frobenius"}
        How each voxel's Hessian is measured (:func:`cider.losses.hessian_penalty`): the
        sum of its entries' absolute values (``entries``, the paper's prior) or the
        Frobenius norm of the matrix (``frobenius``), which does not depend on how a
        structure lies against the axes. Minimised over the voxels on the synthetic 3D
        fluorescence volumes, ``frobenius`` with twice the ``hessian_noise_weight``
        scored +0.06 / +0.10 dB over ``entries`` on two draws (bench/README.md, "The loss
        against the truth", second pass, item 8); the generator gained nothing from it
        at 300 it. (CPU, two volumes), and 1000 it. is unmeasured, so opt-in.
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
    polish_iterations : int
        After the generator fit, minimise the same loss further over the voxels directly
        (no generator: softplus-parametrised voxels, Adam at ``polish_learning_rate``) for
        this many steps, from the fit's estimate; 0: off. A step costs a blur and the
        loss's terms, not the generator's forward and backward pass (a few per cent of a
        generator iteration). On an ill-conditioned blur the generator's path to its
        loss's minimum is slow (widefield volumes: +0.07 dB per 100 it. at 1000 it.), and
        with ``ssim_weight: 0`` the polish gets there: on a synthetic widefield volume a
        300-it. fit went from 28.8 to 31.6–31.7 dB after 300–1000 steps, 1.6–1.8 dB over
        oracle RL (bench/README.md, "Polishing the fit over the voxels"). With the SSIM
        term on, the loss's minimum scored 0.1–2.4 dB under the generator's fit on four of
        five synthetic volumes, so leave it off there. Off by default; the fit's loss
        history is the generator's, and the polish's is ``Fit.polish_losses``. A stop
        (discrepancy, plateau) ends the generator's part; the polish then runs all its
        steps.
    polish_learning_rate : float
        Adam's learning rate of the polish (on the softplus parameter of each voxel, in
        units of the intensity scale).
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
    hessian_norm: str = "entries"
    sparsity_weight: float = 0.0
    data_weight: float = 0.0
    output: str = "softplus"
    stop: str = "none"
    discrepancy: float = 1.0
    preserve_flux: bool = True
    keep_best: bool = True
    keep_best_by: str = "loss"
    average: float = 0.0
    polish_iterations: int = 0
    polish_learning_rate: float = 0.01
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
            "polish_iterations": self.polish_iterations >= 0,
            "polish_learning_rate": self.polish_learning_rate > 0,
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
            ("hessian_norm", HESSIAN_NORMS),
            ("keep_best_by", KEEP_BEST_BY),
        ):
            if getattr(self, name) not in allowed:
                raise CiderError(
                    f"RestoreConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

        if self.polish_iterations and self.method != "cider":
            raise CiderError(
                f"RestoreConfig: polish_iterations polishes the generator fit; with method={self.method!r} set it to 0"
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
