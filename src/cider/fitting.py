"""The generator fit: one observation, or a batch of same-shape observations at once.

:func:`fit_generators` fits B observations (tiles of one image, or same-sized images) in
one process. Every member has its own generator weights and optimiser state; the B
generators run as one batched forward pass (``torch.func.stack_module_state`` layout +
``vmap(functional_call)``), and the loss is the sum of the members' losses, so the
gradient of member *i*'s weights is exactly the gradient of its own loss: the batch is
B independent fits, computed together. A member that stops early (discrepancy or
plateau) is taken out of the batch at that check, with its weights and optimiser state,
so the others continue unchanged. :func:`fit_generator` is the batch of one.
:func:`fit_rl` is the plain Richardson–Lucy baseline (``RestoreConfig.method="rl"``) with
the same result type, object grid, flux renormalisation and finite check.

What makes a batch fast is the device: on a GPU a small tile leaves most of it idle, and
B tiles per forward pass fill it. On a CPU a batch pays off only for small members, so
there the members are fitted in chunks (``CPU_BATCH_VOXELS``; ``bench/throughput.py``).
Batch normalisation runs in training mode as in the sequential fit (batch statistics of
each member's own activations; running statistics are not used by the fit and are not
kept).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

from .errors import CiderError
from .generator import Generator, GeneratorConfig, Strides, softplus_inverse
from .losses import hessian_penalty, sparsity_penalty, ssim_loss, variance_stabilised
from .noise import NoiseModel
from .restore_config import RestoreConfig
from .rl import BlurOperator, censored, richardson_lucy

__all__ = [
    "Prepared",
    "Fit",
    "Generators",
    "check_compile",
    "fit_generator",
    "fit_generators",
    "fit_rl",
    "noise_aware_weights",
    "objective",
    "objective_terms",
    "start_level",
]

# On a CPU a batch is faster only for small members (bench/results/throughput.md: 1.4× for
# 8 tiles of 76² object voxels, 0.8× for 140², 0.6× for 268²): there, members are fitted
# together in chunks of at most this many object voxels when at least 4 fit in a chunk,
# and one at a time otherwise. On CUDA the whole batch is one chunk.
CPU_BATCH_VOXELS = 48_000
# torch.compile backend of ``RestoreConfig.compile``. The tests set "eager": the same traced
# graph (so a graph break or a tracing error shows), without the minutes of code generation
# on a CPU.
COMPILE_BACKEND = "inductor"
# Distinct generator input shapes one process compiles for (``RestoreConfig.compile``). Each
# new shape recompiles (minutes), and past its recompile limit dynamo refuses a fullgraph
# function instead of falling back, so the fit raises a CiderError first. A fit job holds at
# most ``cider.workflow.plan.COMPILE_SHAPES_PER_JOB`` shapes.
COMPILE_SHAPES = 16
# Dynamo graphs allowed per compiled pass: a shape can take several (the batch shrinking as
# members stop, dynamic sizes after the first recompile).
COMPILE_GRAPHS = 8 * COMPILE_SHAPES
_compiled_shapes: set[tuple] = set()

Callback = Callable[[int, float, torch.Tensor], None]
BatchCallback = Callable[[int, int, float, torch.Tensor], None]


@dataclass
class Prepared:
    """Observation ready for the method (made by :func:`cider.restore.prepare`):
    background removed, divided by ``scale``.

    ``image = observation * scale`` maps results back to data units; ``noise`` is the
    noise model of ``observation`` (already scaled), ``mean_signal`` the mean signal
    (same units; the whole image's in the workflow, so all its tiles agree, ≥ 0) and
    ``noise_level`` the noise's standard deviation there, which sets the noise-aware
    loss weights and the variance-stabilised Hessian's scale. ``saturated`` marks the
    pixels at a camera's full scale: their true value is only known to be at least the
    data there, so the fits treat them as lower bounds (censored), not as measurements.
    ``background`` is the background removed (a map or a level, not the offset), which
    plain RL keeps in its model (:func:`fit_rl`).
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
class Fit:
    """Outcome of one member's generator fit.

    Attributes
    ----------
    estimate : torch.Tensor
        The estimate, shape ``object_shape`` (units of the prepared observation).
    losses : list of float
        Total loss per iteration.
    chi2 : float
        Final data misfit per pixel in units of the noise variance.
    stopped : str
        ``discrepancy`` (χ² reached the noise level), ``plateau`` (early stopping),
        ``iterations`` (ran them all) or ``flat`` (a constant observation, returned as
        itself without a fit).
    flux_factor : float
        Factor the estimate was multiplied by to keep the observed flux (1 if not).
    weights : dict of str to torch.Tensor or None
        The generator's final weights (on the CPU), when asked for with ``keep_weights``:
        the warm start of another fit.
    polish_losses : list of float
        Total loss per step of the polish over the voxels (``polish_iterations``; empty
        when off). ``chi2`` is then the polished estimate's.
    """

    estimate: torch.Tensor
    losses: list[float]
    chi2: float
    stopped: str
    flux_factor: float = 1.0
    weights: dict[str, torch.Tensor] | None = None
    polish_losses: list[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return len(self.losses)


def noise_aware_weights(config: RestoreConfig, noise_level: float) -> tuple[float, float]:
    """Hessian weight and SSIM ``k2`` for a noise level σ (see :class:`RestoreConfig`)."""
    hessian = config.hessian_weight + config.hessian_noise_weight * noise_level**2
    return hessian, max(0.03, config.ssim_noise_factor * noise_level)


def learning_rate(config: RestoreConfig, iteration: int) -> float:
    """Learning rate of 0-based ``iteration``: halved at every milestone passed."""
    milestones = {max(1, math.floor(m * config.iterations)) for m in config.lr_milestones}
    return config.learning_rate * 0.5 ** sum(iteration >= m for m in milestones)


def _is_flat(y: torch.Tensor) -> bool:
    return bool((y.amax() - y.amin()) <= 1e-7 * max(float(y.abs().amax()), 1e-30))


def _flat_fit(prepared: Prepared) -> Fit | None:
    """The result for a constant observation, or ``None``: it is the blur of the same
    constant, so there is nothing to fit (and a flat target makes the SSIM gradient
    degenerate)."""
    y = prepared.observation
    if not _is_flat(y):
        return None
    shape = tuple(n + k - 1 for n, k in zip(y.shape, prepared.psf.shape))
    return Fit(torch.full(shape, float(y.flatten()[0]), device=y.device), [], 0.0, "flat")


def fit_generator(
    features: torch.Tensor,
    prepared: Prepared,
    config: RestoreConfig,
    callback: Callback | None = None,
    start: dict[str, torch.Tensor] | None = None,
    keep_weights: bool = False,
) -> Fit:
    """Fit a generator to one observation, freshly initialised or from ``start``.

    Parameters
    ----------
    features : torch.Tensor
        Generator input ``(C, *object_shape)`` from :func:`cider.restore.deconvolved_features`.
    prepared : Prepared
        Observation, PSF and noise model.
    config : RestoreConfig
        Loss weights, optimiser, schedule and stopping rule.
    callback : callable, optional
        Called as ``callback(iteration, loss, estimate)`` every ``config.log_every``
        iterations (``estimate`` is the current output, detached).
    start, keep_weights
        As in :func:`fit_generators`.

    Returns
    -------
    Fit
        Estimate, loss history and why the fit stopped.

    Raises
    ------
    CiderError
        If the fit produced non-finite values (never written out silently).
    """
    member_callback = None
    if callback is not None:

        def member_callback(iteration: int, member: int, loss: float, estimate: torch.Tensor) -> None:
            callback(iteration, loss, estimate)

    return fit_generators(
        [features], [prepared], config, member_callback, start=start, keep_weights=keep_weights
    )[0]


def fit_rl(prepared: Prepared, config: RestoreConfig, label: str = "image") -> Fit:
    """Plain Richardson–Lucy of one observation for ``config.rl_iterations`` iterations.

    The baseline restoration (``method="rl"``): no features and no generator. It runs on
    the valid-convolution model, so its estimate has the generator's object grid (image +
    PSF − 1) and goes through the same flux renormalisation and finite check. RL needs
    non-negative data. A background that was removed (``prepared.background``: the wavelet
    map or the flat level, ≥ 0) is put back into the data and into RL's model
    (``y ~ Poisson(Ax + background)``) rather than subtracted from data clipped at 0,
    which would lose the noise's negative excursions and with them much of faint
    objects' light; what remains negative (a camera offset's read noise) counts as 0.

    Parameters
    ----------
    prepared : Prepared
        Observation, PSF and noise model.
    config : RestoreConfig
        ``rl_iterations`` and ``preserve_flux`` are used.
    label : str
        Name of the observation (e.g. its tile id) for error messages.

    Returns
    -------
    Fit
        The estimate; ``losses`` holds the χ² per pixel (in units of the noise variance)
        of the estimate each iteration started from, ``chi2`` the final estimate's.
    """
    flat = _flat_fit(prepared)
    if flat is not None:
        return flat
    observation, psf = prepared.observation, prepared.psf
    losses: list[float] = []

    def chi2(blurred: torch.Tensor) -> float:
        variance = prepared.noise.variance(blurred)
        data = censored(observation, blurred, prepared.saturated)
        return float(((blurred - data) ** 2 / variance).mean())

    blur = BlurOperator(psf, observation.shape, "valid")
    background = 0.0 if prepared.background is None else prepared.background.clamp_min(0)
    with torch.no_grad():
        estimate = richardson_lucy(
            (observation + background).clamp_min(0),
            psf,
            config.rl_iterations,
            boundary="valid",
            callback=lambda iteration, model: losses.append(chi2(model - background)),
            saturated=prepared.saturated,
            background=background,
        )
        final = chi2(blur(estimate))
    return _finish(estimate, blur, prepared, losses, final, "iterations", config, label)


@dataclass
class _Members:
    """Per-member tensors of the members still fitting, stacked on dimension 0."""

    index: list[int]  # position of each active member in the caller's list
    inputs: torch.Tensor  # (B, C, *object_shape)
    targets: torch.Tensor  # (B, 1, *image_shape)
    gain: torch.Tensor  # (B, 1, ...) noise variance per unit signal
    floor: torch.Tensor  # (B, 1, ...) noise variance at zero signal
    level: torch.Tensor  # (B, 1, ...) mean signal of the image (all its tiles share it)
    hessian: torch.Tensor  # (B,) Hessian weight
    k2: torch.Tensor  # (B,) SSIM contrast constant
    data: torch.Tensor  # (B,) weight of the χ² term (data_weight · σ²)
    saturated: torch.Tensor | None  # (B, 1, *image_shape) bool: censored pixels; None: none in the batch
    best: list[float]
    since_best: list[int]
    losses: list[list[float]]

    def keep(self, rows: list[int]) -> _Members:
        """The members at ``rows`` (positions in this batch)."""
        pick = torch.tensor(rows, device=self.inputs.device)
        return _Members(
            [self.index[r] for r in rows],
            *(t.index_select(0, pick) for t in self._tensors()),
            self.saturated.index_select(0, pick) if self.saturated is not None else None,
            [self.best[r] for r in rows],
            [self.since_best[r] for r in rows],
            [self.losses[r] for r in rows],
        )

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.inputs, self.targets, self.gain, self.floor, self.level, self.hessian, self.k2, self.data

    def targets_for(self, blurred: torch.Tensor) -> torch.Tensor:
        """The data the loss compares ``blurred`` with: saturated pixels are lower bounds
        (censored), so where the model is already above them it is not pulled down."""
        return censored(self.targets, blurred, self.saturated)


def _members(
    features: Sequence[torch.Tensor], prepared: Sequence[Prepared], active: list[int], config: RestoreConfig
) -> _Members:
    observation = prepared[active[0]].observation
    device, dtype, ndim = observation.device, observation.dtype, observation.ndim
    weights = [noise_aware_weights(config, prepared[i].noise_level) for i in active]

    def column(values: list[float], per_pixel: bool = False) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype, device=device)
        return t.reshape(-1, *([1] * (ndim + 1))) if per_pixel else t

    return _Members(
        index=list(active),
        inputs=torch.stack([features[i].to(device, dtype) for i in active]),
        targets=torch.stack([prepared[i].observation for i in active])[:, None],
        gain=column([prepared[i].noise.gain for i in active], per_pixel=True),
        floor=column([prepared[i].noise.floor for i in active], per_pixel=True),
        level=column([prepared[i].mean_signal for i in active], per_pixel=True),
        hessian=column([w[0] for w in weights]),
        k2=column([w[1] for w in weights]),
        data=column([config.data_weight * prepared[i].noise_level ** 2 for i in active]),
        saturated=_saturated_masks([prepared[i] for i in active]),
        best=[math.inf] * len(active),
        since_best=[0] * len(active),
        losses=[[] for _ in active],
    )


def start_level(prepared: Prepared) -> float:
    """Mean signal of this observation (tile), negative noise excursions counting as 0:
    where each generator's output starts."""
    return float(prepared.observation.clamp_min(0).mean())


def _check_batch(prepared: Sequence[Prepared], active: list[int]) -> None:
    first = prepared[active[0]]
    for i in active[1:]:
        other = prepared[i]
        if other.observation.shape != first.observation.shape:
            raise CiderError(
                f"batched fit: member {i} has shape {tuple(other.observation.shape)}, member "
                f"{active[0]} {tuple(first.observation.shape)}; a batch needs one tile shape"
            )
        same_psf = other.psf.shape == first.psf.shape and bool(torch.equal(other.psf, first.psf))
        if not same_psf or other.voxel_size != first.voxel_size:
            raise CiderError(f"batched fit: member {i} has another PSF or voxel size than member {active[0]}")


def _saturated_masks(prepared: Sequence[Prepared]) -> torch.Tensor | None:
    """(B, 1, *shape) bool of the members' saturated pixels; None when no member has any."""
    if all(p.saturated is None for p in prepared):
        return None
    return torch.stack(
        [
            p.saturated if p.saturated is not None else torch.zeros_like(p.observation, dtype=torch.bool)
            for p in prepared
        ]
    )[:, None]


def _chi2(blurred: torch.Tensor, members: _Members) -> torch.Tensor:
    """χ² per pixel of every member, in units of the noise variance taken at ``Ax``."""
    variance = members.gain * blurred.detach().clamp(min=0) + members.floor
    return ((blurred - members.targets_for(blurred)) ** 2 / variance).flatten(1).mean(1)


class Generators:
    """B generators with the same initial weights, as stacked parameter tensors."""

    def __init__(
        self,
        inputs: torch.Tensor,
        config: RestoreConfig,
        levels: list[float],
        start: dict[str, torch.Tensor] | None = None,
        strides: Strides = (),
    ):
        torch.manual_seed(config.seed)
        ndim, device = inputs.ndim - 2, inputs.device
        module = Generator(
            ndim, GeneratorConfig(in_channels=inputs.shape[1], output=config.output, strides=strides)
        )
        replace_all_batch_norm_modules_(module)  # batch statistics only, no running buffers
        # Only the initial weights come from it: the passes run _forwards' template on self.params.
        module = module.to(device=device, dtype=inputs.dtype)
        if start is not None:
            _load_start(module, start)
        self.params = {
            name: p.detach()[None].repeat(len(levels), *([1] * p.ndim)).requires_grad_()
            for name, p in module.named_parameters()
        }
        if config.output == "softplus" and start is None:
            bias = [softplus_inverse(level) for level in levels]
            with torch.no_grad():
                self.params["head.bias"].copy_(torch.tensor(bias)[:, None])
        self.optimizer = torch.optim.NAdam(
            list(self.params.values()), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        # bfloat16: the body runs on bf16 copies of the float32 weights (gradients flow back
        # to them through the cast); the 1×1 head, the output and the optimiser stay float32.
        # (Batch-norm parameters kept float32 measured as fast and took 21% more memory.)
        self.low_precision = config.precision == "bfloat16"
        backend = COMPILE_BACKEND if config.compile else None
        self.one, self.many = _forwards(ndim, inputs.shape[1], config.output, backend, strides)
        self.compiled = backend is not None
        if self.compiled:
            _count_compiled_shape((ndim, inputs.shape[1], config.output, strides, tuple(inputs.shape[2:])))

    def weights(self, row: int) -> dict[str, torch.Tensor]:
        """Member ``row``'s current weights, detached, on the CPU."""
        return {name: p[row].detach().to("cpu", copy=True) for name, p in self.params.items()}

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Outputs ``(B, 1, *object_shape)`` of the B generators for inputs ``(B, C, ...)``."""
        params = self.params
        if self.low_precision:
            params = {k: v if k.startswith("head.") else v.to(torch.bfloat16) for k, v in params.items()}
            inputs = inputs.to(torch.bfloat16)
        if not self.compiled:
            return self._forward(params, inputs)
        with torch._dynamo.config.patch(recompile_limit=COMPILE_GRAPHS):
            return self._forward(params, inputs)

    def _forward(self, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) == 1:  # the plain module is faster than a vmap of one
            return self.one({k: v[0] for k, v in params.items()}, inputs)
        return self.many(params, inputs)

    def keep(self, rows: list[int]) -> None:
        """Drop every member but ``rows``, with its weights and optimiser state."""
        pick = torch.tensor(rows, device=next(iter(self.params.values())).device)
        old_state = self.optimizer.state
        new_params = {k: p.detach().index_select(0, pick).requires_grad_() for k, p in self.params.items()}
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        optimizer = torch.optim.NAdam(list(new_params.values()), **group)
        for name, new in new_params.items():
            old = self.params[name]
            optimizer.state[new] = {
                key: value.index_select(0, pick)
                if torch.is_tensor(value) and value.shape == old.shape
                else value
                for key, value in old_state[old].items()
            }
        self.params, self.optimizer = new_params, optimizer


def _count_compiled_shape(key: tuple) -> None:
    """Register a generator input shape (with the generator's kind) this process compiles for.

    Raises
    ------
    CiderError
        When it would be more than ``COMPILE_SHAPES``, naming ``restore.compile``.
    """
    if key not in _compiled_shapes and len(_compiled_shapes) >= COMPILE_SHAPES:
        raise CiderError(
            f"restore.compile: this process has compiled the generator for {COMPILE_SHAPES} input "
            f"shapes, the most it compiles for (each new one takes minutes and torch then refuses "
            f"more); the next would be {list(key[-1])}. Set restore.compile: false for many "
            f"differently sized images, or restore fewer shapes per process"
        )
    _compiled_shapes.add(key)


@lru_cache(maxsize=8)
def _forwards(
    ndim: int, in_channels: int, output: str, backend: str | None, strides: Strides = ()
) -> tuple[Callable, Callable]:
    """Forward passes (one member, a batch) of a generator kind, ``torch.compile``d with
    ``backend`` unless it is None (``RestoreConfig.compile``).

    They run a template module through ``functional_call`` with the weights passed in,
    so every fit of the process (each chunk of a tile job, each batch) shares them, and a
    compiled pass compiles once per input shape instead of once per fit. The template's
    own weights are never used, and after ``replace_all_batch_norm_modules_`` it has no
    buffers.
    """
    module = Generator(ndim, GeneratorConfig(in_channels=in_channels, output=output, strides=strides))
    replace_all_batch_norm_modules_(module)

    def one(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(module, params, (x,))

    def many(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return vmap(lambda p, member: one(p, member[None])[0])(params, x)

    if backend is None:
        return one, many
    return (
        torch.compile(one, backend=backend, fullgraph=True),
        torch.compile(many, backend=backend, fullgraph=True),
    )


@lru_cache(maxsize=4)
def check_compile(device: torch.device, backend: str = "inductor") -> None:
    """Fail now if ``torch.compile`` cannot build code on ``device`` (``RestoreConfig.compile``).

    Compiles a small forward and backward pass (seconds; the generator's compilation
    then takes minutes). Without this, a node without a C++ compiler (CPU) or without
    Triton (CUDA) would fail at the first iteration of the fit, after the job's features
    and RL were computed. Checked once per device and backend in a process.

    Raises
    ------
    CiderError
        Naming ``restore.compile``, the device, torch's reason and what to do.
    """
    probe = torch.compile(lambda x: torch.sigmoid(x) * 2 + 1, backend=backend, fullgraph=True)
    x = torch.ones(8, device=device, requires_grad=True)
    try:
        probe(x).sum().backward()
    except Exception as err:  # torch raises backend-specific types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        need = "Triton (it comes with the CUDA build of torch)" if device.type == "cuda" else "a C++ compiler"
        raise CiderError(
            f"restore.compile: torch.compile ({backend}) cannot build code on {device}: {reason}. "
            f"Make {need} available on the nodes that fit, or set restore.compile: false"
        ) from err


def fit_generators(
    features: Sequence[torch.Tensor],
    prepared: Sequence[Prepared],
    config: RestoreConfig,
    callback: BatchCallback | None = None,
    labels: Sequence[str] | None = None,
    start: dict[str, torch.Tensor] | None = None,
    keep_weights: bool = False,
) -> list[Fit]:
    """Fit B generators to B same-shape observations at once (B independent fits).

    Parameters
    ----------
    features : sequence of torch.Tensor
        Generator input of every member, ``(C, *object_shape)``.
    prepared : sequence of Prepared
        Observation of every member: one shape, one PSF and voxel size; each its own
        noise model and noise level (so its own loss weights).
    config : RestoreConfig
        Loss weights, optimiser, schedule and stopping rule (shared).
    callback : callable, optional
        ``callback(iteration, member, loss, estimate)`` for every member still fitting,
        every ``config.log_every`` iterations.
    labels : sequence of str, optional
        Names of the members (e.g. tile ids) for error messages.
    start : dict of str to torch.Tensor, optional
        Warm start: every member's generator begins from these weights (``Fit.weights``
        of an earlier fit with the same input channels and dimensionality, e.g. a
        neighbouring tile's) instead of a fresh initialisation; the optimiser state and
        the learning-rate schedule start afresh.
    keep_weights : bool
        Return each member's final weights in ``Fit.weights``.

    Returns
    -------
    list of Fit
        One per member, in order; equal (to float rounding) to fitting each alone.

    Raises
    ------
    CiderError
        If the members' shapes or PSFs differ, or a member's fit produced non-finite
        values (the message names the member).
    """
    if len(features) != len(prepared) or not prepared:
        raise CiderError(f"batched fit: {len(features)} feature arrays for {len(prepared)} observations")
    labels = list(labels) if labels is not None else [f"member {i}" for i in range(len(prepared))]
    fits: list[Fit | None] = [_flat_fit(p) for p in prepared]
    active = [i for i, f in enumerate(fits) if f is None]
    if not active:
        return fits
    _check_batch(prepared, active)
    device = prepared[active[0]].observation.device
    if device.type == "cuda":
        _configure_cuda(config.deterministic)
    if config.compile:
        check_compile(device, COMPILE_BACKEND)
    size = len(active) if device.type == "cuda" else _cpu_chunk(features[active[0]][0].numel())
    for first in range(0, len(active), size):
        chunk = active[first : first + size]
        _fit_together(features, prepared, chunk, config, callback, labels, fits, start, keep_weights)
    return fits


def _cpu_chunk(voxels: int) -> int:
    """Members per chunk on a CPU (see ``CPU_BATCH_VOXELS``)."""
    size = CPU_BATCH_VOXELS // voxels
    return size if size >= 4 else 1


def _fit_together(
    features: Sequence[torch.Tensor],
    prepared: Sequence[Prepared],
    active: list[int],
    config: RestoreConfig,
    callback: BatchCallback | None,
    labels: list[str],
    fits: list[Fit | None],
    start: dict[str, torch.Tensor] | None = None,
    keep_weights: bool = False,
) -> None:
    """Fit the members ``active`` in one batch; store each one's Fit in ``fits``."""
    first = prepared[active[0]]
    blur = BlurOperator(first.psf, first.observation.shape, boundary="valid")
    members = _members(features, prepared, active, config)
    levels = [start_level(prepared[i]) for i in active]
    generators = Generators(members.inputs, config, levels, start, config.strides(first.voxel_size))
    average: torch.Tensor | None = None
    # keep_best: the estimate at the lowest logged loss, so a late loss spike is not returned
    keep_best = config.keep_best and not config.average
    kept: torch.Tensor | None = None
    lowest: list[float] = []
    pending: list[torch.Tensor] = []
    for iteration in range(config.iterations):
        for group in generators.optimizer.param_groups:
            group["lr"] = learning_rate(config, iteration)
        generators.optimizer.zero_grad(set_to_none=True)
        estimate = generators(members.inputs).to(members.targets.dtype)
        if config.average:
            current = estimate.detach()
            average = current.clone() if average is None else average.lerp_(current, 1 - config.average)
        blurred = blur(estimate)
        loss = sum(_loss_terms(estimate, blurred, members, config, first.voxel_size).values())
        loss.sum().backward()
        generators.optimizer.step()
        pending.append(loss.detach())
        last = iteration == config.iterations - 1
        if (iteration + 1) % config.log_every and not last:
            continue
        # One device synchronisation per ``log_every`` iterations.
        block = torch.stack(pending).T.tolist()
        pending.clear()
        with torch.no_grad():
            chi2 = _chi2(blurred, members).tolist()
        current = average if average is not None else estimate.detach()
        if keep_best:  # the estimate of this forward pass has the loss just logged
            if kept is None:
                kept, lowest = current.clone(), [math.inf] * len(block)
            for row, values in enumerate(block):
                judged = _judged(values, config.keep_best_by)
                if judged < lowest[row]:
                    lowest[row] = judged
                    kept[row] = current[row]
        stopping: dict[int, str] = {}
        for row, values in enumerate(block):
            members.losses[row] += values
            if callback is not None:
                callback(iteration, members.index[row], values[-1], current[row, 0])
            if not all(math.isfinite(v) for v in values):
                raise CiderError(
                    f"{labels[members.index[row]]}: generator fit diverged (loss {values[-1]}) at "
                    f"iteration {iteration + 1}; lower restore.learning_rate or check the data"
                )
            if config.stop == "discrepancy" and chi2[row] <= config.discrepancy:
                stopping[row] = "discrepancy"
            elif config.early_stop_patience and _plateau(members, row, values, config):
                stopping[row] = "plateau"
        if last:
            stopping = {row: stopping.get(row, "iterations") for row in range(len(members.index))}
        if not stopping:
            continue
        if keep_best:
            final = kept
        else:
            with torch.no_grad():
                final = average if average is not None else generators(members.inputs)
        done = sorted(stopping)
        estimates, done_chi2 = final[done], [chi2[row] for row in done]
        polish_losses: list[list[float]] = [[] for _ in done]
        if config.polish_iterations:
            estimates, polish_losses, done_chi2 = polish(
                estimates, blur, members.keep(done), config, first.voxel_size
            )
        for k, row in enumerate(done):
            i = members.index[row]
            fits[i] = _finish(
                estimates[k, 0],
                blur,
                prepared[i],
                members.losses[row],
                done_chi2[k],
                stopping[row],
                config,
                labels[i],
            )
            fits[i].polish_losses = polish_losses[k]
            if keep_weights:
                fits[i].weights = generators.weights(row)
        rows = [r for r in range(len(members.index)) if r not in stopping]
        if not rows:
            break
        members = members.keep(rows)
        generators.keep(rows)
        if average is not None:
            average = average[rows]
        if keep_best:
            kept, lowest = kept[rows], [lowest[r] for r in rows]


def polish(
    estimates: torch.Tensor,
    blur: BlurOperator,
    members: _Members,
    config: RestoreConfig,
    voxel_size: tuple[float, ...] | None,
) -> tuple[torch.Tensor, list[list[float]], list[float]]:
    """The fit's loss minimised further over the voxels, from the fit's estimates.

    Each voxel is the softplus of a free parameter (so the estimate stays positive),
    started at the estimate (floored at 1e-4) and moved by Adam at
    ``config.polish_learning_rate`` for ``config.polish_iterations`` steps. The members'
    losses are summed, so each member's parameters see only its own loss's gradient:
    a batch polishes as its members would one by one.

    Parameters
    ----------
    estimates : torch.Tensor
        ``(B, 1, *object_shape)``, the fits' estimates.
    blur : BlurOperator
        The members' blur (``valid`` boundary).
    members : _Members
        The members' data, noise weights and loss weights, in the order of ``estimates``.
    config : RestoreConfig
        The loss's weights and the polish's steps and learning rate.
    voxel_size : tuple of float or None
        For the Hessian prior.

    Returns
    -------
    tuple
        The polished estimates (same shape), each member's loss per step (at the estimate
        the step started from), and each one's final χ².
    """
    start = estimates.detach().clamp_min(1e-4)
    param = (start + torch.log(-torch.expm1(-start))).requires_grad_()
    optimizer = torch.optim.Adam([param], lr=config.polish_learning_rate)
    pending = []
    for _ in range(config.polish_iterations):
        optimizer.zero_grad(set_to_none=True)
        estimate = F.softplus(param)
        loss = sum(_loss_terms(estimate, blur(estimate), members, config, voxel_size).values())
        loss.sum().backward()
        optimizer.step()
        pending.append(loss.detach())
    with torch.no_grad():
        estimate = F.softplus(param)
        chi2 = _chi2(blur(estimate), members).tolist()
    return estimate, torch.stack(pending).T.tolist(), chi2


def _loss_terms(
    estimate: torch.Tensor,
    blurred: torch.Tensor,
    members: _Members,
    config: RestoreConfig,
    voxel_size: tuple[float, ...] | None,
) -> dict[str, torch.Tensor]:
    """The weighted terms of every member's loss, each of shape (B,); the loss is their sum.

    Terms with a zero weight are left out (not computed); the SSIM term is kept when there
    is no χ² term, so that the loss always compares the model with the data.
    """
    terms: dict[str, torch.Tensor] = {}
    if config.ssim_weight or not config.data_weight:
        ssim_spacing = voxel_size if config.ssim_window == "physical" else None
        terms["ssim"] = config.ssim_weight * ssim_loss(
            blurred, members.targets_for(blurred), k2=members.k2, per_sample=True, spacing=ssim_spacing
        )
    if config.data_weight:
        terms["data"] = members.data * _chi2(blurred, members)
    if config.hessian_weight or config.hessian_noise_weight:
        curvature = (
            variance_stabilised(estimate, members.gain, members.floor, members.level)
            if config.hessian_domain == "stabilised"
            else estimate
        )
        terms["hessian"] = members.hessian * hessian_penalty(
            curvature, voxel_size, per_sample=True, norm=config.hessian_norm
        )
    if config.sparsity_weight:
        terms["sparsity"] = config.sparsity_weight * sparsity_penalty(estimate, per_sample=True)
    return terms


def objective(prepared: Prepared, config: RestoreConfig) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The generator fit's loss as a function of the estimate, its terms apart (differentiable).

    The loss a fit of ``prepared`` with ``config`` minimises is the sum of the terms the
    returned function gives; evaluated at another estimate (the truth of a synthetic case,
    an RL result) they show which term prefers which estimate. The noise weights and the
    blur are made once here, so the function can be called at every step of an
    optimisation (``bench/objective.py`` minimises the loss over the voxels with it).

    Parameters
    ----------
    prepared : Prepared
        Observation, PSF, noise model and voxel size, as the fit gets them.
    config : RestoreConfig
        The loss weights.

    Returns
    -------
    callable
        ``terms(estimate)`` for a non-negative estimate on the fit's object grid (image +
        PSF − 1 per axis), in the units of ``prepared.observation``. It returns the weighted
        terms (scalars) ``ssim``, ``data``, ``hessian``, ``sparsity``, each where its weight
        is not zero (``ssim`` also where no term has data in it), and ``chi2`` (unweighted,
        per pixel, in units of the noise variance) for reference, not part of the loss. It
        raises :class:`CiderError` for an estimate of another shape.
    """
    observation = prepared.observation
    shape = tuple(n + k - 1 for n, k in zip(observation.shape, prepared.psf.shape))
    members = _members([observation.new_zeros((1, *shape))], [prepared], [0], config)
    blur = BlurOperator(prepared.psf, observation.shape, boundary="valid")

    def terms(estimate: torch.Tensor) -> dict[str, torch.Tensor]:
        if tuple(estimate.shape) != shape:
            raise CiderError(
                f"objective: estimate of shape {tuple(estimate.shape)}; the object grid is {shape} "
                "(image + PSF − 1 per axis)"
            )
        x = estimate.to(observation.dtype)[None, None]
        blurred = blur(x)
        loss = _loss_terms(x, blurred, members, config, prepared.voxel_size)
        return {**{k: v[0] for k, v in loss.items()}, "chi2": _chi2(blurred, members)[0]}

    return terms


def objective_terms(
    estimate: torch.Tensor, prepared: Prepared, config: RestoreConfig
) -> dict[str, torch.Tensor]:
    """The terms of the generator fit's loss at one ``estimate``: :func:`objective` of
    ``prepared`` and ``config``, evaluated there (see it for the terms)."""
    return objective(prepared, config)(estimate)


def _load_start(module: Generator, start: dict[str, torch.Tensor]) -> None:
    """Load warm-start weights into a fresh generator, or say why they do not fit it."""
    own = dict(module.named_parameters())
    missing = sorted(set(own) - set(start))
    wrong = [k for k in own if k in start and tuple(start[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        what = f"missing {missing[:3]}" if missing else f"shape of {wrong[:3]}"
        raise CiderError(
            f"warm start: the weights do not fit this generator ({what}); they must come from a "
            "fit with the same dimensionality and generator input"
        )
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(start[name])


def _configure_cuda(deterministic: bool) -> None:
    """Fastest cuDNN kernels, or deterministic ones only (``RestoreConfig.deterministic``)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)


def _plateau(members: _Members, row: int, values: list[float], config: RestoreConfig) -> bool:
    """Update the member's best loss with ``values``; True once it stalled for the patience."""
    for value in values:
        if value < members.best[row] * (1 - config.early_stop_tol):
            members.best[row], members.since_best[row] = value, 0
        else:
            members.since_best[row] += 1
    return members.since_best[row] >= config.early_stop_patience


def _judged(values: list[float], by: str) -> float:
    """The loss by which ``keep_best`` judges the estimate that ends a log block of
    ``values``: its own (``by="loss"``), or the larger of its own and the block's mean
    (``"block"``), so that neither a one-iteration dip (judged by the mean) nor the first
    iteration of a spike (judged by its own loss) is returned."""
    own = values[-1]
    return max(own, sum(values) / len(values)) if by == "block" else own


@torch.no_grad()
def _finish(
    estimate: torch.Tensor,
    blur: BlurOperator,
    prepared: Prepared,
    losses: list[float],
    chi2: float,
    stopped: str,
    config: RestoreConfig,
    label: str,
) -> Fit:
    """Flux renormalisation and the finite check of one member's final estimate.

    The flux is matched on the field's interior (data at least a PSF radius from its
    edge), whose re-blurred values come from object voxels inside the field only: light
    the fit put outside the field (weakly constrained by the data) does not scale it.
    """
    flux_factor = 1.0
    if config.preserve_flux:
        interior = tuple(
            slice(k // 2, n - k // 2) if n > 2 * (k // 2) + 8 else slice(None)
            for n, k in zip(prepared.observation.shape, prepared.psf.shape)
        )
        blurred = blur(estimate)
        # saturated pixels are lower bounds: count the model's light where it is above them
        observed = float(censored(prepared.observation, blurred, prepared.saturated)[interior].sum())
        modelled = float(blurred[interior].sum())
        if observed > 0 and modelled > 0:
            flux_factor = observed / modelled
            estimate = estimate * flux_factor
    if not bool(torch.isfinite(estimate).all()):
        if config.method == "rl":
            raise CiderError(
                f"{label}: Richardson–Lucy produced NaN/infinite values; check the input and PSF"
            )
        if config.polish_iterations:  # the generator's own losses were checked finite as it ran
            raise CiderError(
                f"{label}: the polish over the voxels produced NaN/infinite values; "
                "lower restore.polish_learning_rate"
            )
        raise CiderError(f"{label}: generator fit produced NaN/infinite values; lower restore.learning_rate")
    return Fit(estimate.clone(), losses, chi2, stopped, flux_factor)
