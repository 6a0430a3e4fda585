"""Command line: ``cider restore``, ``cider psf``, ``cider train-features``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .training import TrainConfig

DESCRIPTION = """\
cider restores (deconvolves) microscopy images and volumes with CiDeR: deep features,
Richardson-Lucy on the features, and a small generator fitted to this one image. No
training data is needed; the PSF must be known (a file, or made with `cider psf`).

examples:
  cider restore blurred.tif --psf psf.tif -o restored.tif
  cider restore cells.png --gaussian-sigma 1.5 --iterations 500 -o restored.png
  cider restore stack.tif --psf psf.tif --background --sparsity 0.5 -o restored.tif
  cider restore beads.tif --psf psf.tif --fluorescence -o restored.tif
  cider restore spots.tif --psf psf.tif --offset 100 -o restored.tif
  cider restore uneven.tif --psf psf.tif --fluorescence --background wavelet -o restored.tif
  cider restore stack.tif --psf bead.tif --voxel 0.5 0.2 0.2 --psf-voxel 0.25 0.1 0.1 --fluorescence -o out.tif
  cider psf --gaussian 1.5 -o psf.tif
  cider psf --widefield --na 1.4 --wavelength 0.52 --voxel 0.3 0.1 0.1 --shape 31 31 31 -o psf.tif
  cider train-features --data ../shared/data/train400 -o features.pt
"""


def _hint_modality(image, args: argparse.Namespace) -> None:
    """Say so when the image does not look like the settings chosen (dark background
    without ``--fluorescence``, bright field with it); plain RL is not affected."""
    from .restore_config import looks_like

    if args.rl is not None:
        return
    looks = looks_like(float(image.mean()), float(image.max()))
    ratio = f"mean {100 * image.mean() / max(float(image.max()), 1e-30):.0f} % of the maximum"
    if looks == "fluorescence" and not args.fluorescence:
        print(
            f"cider restore: the image looks like fluorescence ({ratio}); --fluorescence restored such "
            "data 1.0-2.4 dB better on the benchmarks",
            file=sys.stderr,
        )
    elif looks == "brightfield" and args.fluorescence:
        print(
            f"cider restore: the image looks like bright field ({ratio}); on such data --fluorescence "
            "fits the noise (-2.4 to -2.9 dB on the benchmarks): leave it out",
            file=sys.stderr,
        )


def _hint_misfit(chi2: float, config) -> None:
    """Say so when a fit with a data term ends far above χ² = 1 (``CHI2_MISFIT``): the PSF
    or the noise model does not explain the data, and the data term fits the mismatch."""
    from .restore_config import CHI2_MISFIT

    if config.method == "rl" or not config.data_weight or not chi2 > CHI2_MISFIT:
        return
    print(
        f"cider restore: the fit ended at chi2 {chi2:.3g} (about 1 where the model explains the data down "
        "to its noise): the data term fits what the PSF or the noise model cannot explain. Check the PSF, "
        "or try without the data term (leave out --fluorescence); on a 3D benchmark whose PSF does not "
        "explain its data that restored 0.8-1.3 dB better",
        file=sys.stderr,
    )


def _restore(args: argparse.Namespace) -> int:
    from . import io
    from .psf import clean_psf, gaussian_psf
    from .restore import FLUORESCENCE, RestoreConfig, restore

    refusal = _restore_refusal(args)
    if refusal:
        print(f"cider restore: {refusal}", file=sys.stderr)
        return 2
    image = io.read_image(args.input)
    if args.voxel and len(args.voxel) != image.ndim:
        print(
            f"cider restore: --voxel has {len(args.voxel)} sizes for a {image.ndim}D image", file=sys.stderr
        )
        return 2
    psf_notes: list[str] = []
    if args.psf:
        psf, psf_notes = clean_psf(
            io.read_psf(args.psf),
            name=f"--psf {args.psf}",
            psf_voxel_size=args.psf_voxel,
            image_voxel_size=args.voxel if args.psf_voxel else None,
        )
        for note in psf_notes:
            print(f"cider restore: {note}", file=sys.stderr)
    elif args.gaussian_sigma is not None:
        psf = gaussian_psf(args.gaussian_sigma, ndim=image.ndim)
    else:
        print("cider restore: give a PSF with --psf FILE or --gaussian-sigma S", file=sys.stderr)
        return 2
    config = RestoreConfig(
        iterations=RestoreConfig.iterations if args.iterations is None else args.iterations,
        device=args.device,
        sparsity_weight=args.sparsity,
        hessian_weight=RestoreConfig.hessian_weight if args.hessian is None else args.hessian,
        seed=args.seed,
        progress=not args.quiet,
        feature_weights=args.weights,
        early_stop_patience=args.early_stop,
        generator_strides=args.generator_strides,
        hessian_norm=args.hessian_norm,
        ssim_weight=RestoreConfig.ssim_weight if args.ssim_weight is None else args.ssim_weight,
        polish_iterations=args.polish,
    ).with_(background={"enabled": args.background is not None, "method": args.background or "wavelet"})
    if args.fluorescence:
        config = config.with_(
            **FLUORESCENCE, background={"enabled": True, "method": args.background or "flat"}
        )
        if args.weights:
            config = config.with_(feature_weights=args.weights)
    if args.rl is not None:
        config = config.with_(method="rl", rl_iterations=args.rl)
    _hint_modality(image - args.offset, args)
    saturation = _saturation(image, args.saturation)
    result = restore(image, psf, config, voxel_size=args.voxel, saturation=saturation, offset=args.offset)
    _hint_misfit(result.chi2, config)
    restored, text = result.restored, None
    suffix = Path(args.output).suffix.lower()
    if suffix == ".png":
        restored, text, notes = io.png_values(restored, image.dtype)
        for note in notes:
            print(f"cider restore: {note}", file=sys.stderr)
    elif suffix == ".npy":
        print(
            "cider restore: an NPY file holds no metadata: the settings are in the JSON below",
            file=sys.stderr,
        )
    made = _provenance(args, config, psf_notes) | {
        "saturation": saturation,
        "offset": args.offset,
        "background_level": result.background_level,
    }
    io.write_image(args.output, restored, text=text, provenance=made)
    summary = {
        "output": str(args.output),
        "device": result.device,
        "iterations": result.iterations,
        "final_loss": result.loss_history[-1] if result.loss_history else None,
        "chi2": result.chi2 if np.isfinite(result.chi2) else None,
        "stopped": result.stopped,
        "polish_steps": len(result.polish_loss_history),
        "seconds": {k: round(v, 2) for k, v in result.timings.items()},
        "settings": _changed_settings(config),
        "offset": args.offset,
        "background_level": result.background_level,
    }
    print(json.dumps(summary))
    return 0


def _saturation(image: np.ndarray, choice: str) -> float | None:
    """The saturation level ``--saturation`` asks for (``auto``: the camera full scale the
    image reaches, if any), said when pixels are at it."""
    from .restore import full_scale

    if choice == "none":
        return None
    peak = float(image.max())
    level = full_scale(image.dtype, peak, int((image == peak).sum())) if choice == "auto" else float(choice)
    if level is not None:
        count = int((image >= level).sum())
        print(
            f"cider restore: {count} pixel(s) at or above {level:g} (saturated) are taken as lower bounds, "
            "not measurements (--saturation none: as measured)",
            file=sys.stderr,
        )
    return level


def _provenance(args: argparse.Namespace, config, psf_notes: list[str]) -> dict:
    """How the output was made, stored in it (TIFF ImageDescription, PNG text): as the
    pipeline's outputs, every setting with its value, the PSF and what cleaning it changed."""
    from dataclasses import asdict

    from . import __version__

    settings = {key: value for key, value in asdict(config).items() if key != "progress"}
    made = {
        "software": "cider-pipeline",
        "version": __version__,
        "input": str(args.input),
        "psf": args.psf or f"gaussian sigma {args.gaussian_sigma} px",
        "psf_notes": psf_notes,
        "voxel_size": args.voxel,
        "psf_voxel_size": args.psf_voxel,
        "settings": settings,
    }
    return json.loads(json.dumps(made, default=str))


def _changed_settings(config) -> dict:
    """The settings that differ from ``RestoreConfig()``'s (every one that shaped the result
    besides the package defaults), JSON-ready."""
    from dataclasses import asdict

    from .restore import RestoreConfig

    defaults = asdict(RestoreConfig())
    return {
        key: value for key, value in asdict(config).items() if value != defaults[key] and key != "progress"
    }


def _restore_refusal(args: argparse.Namespace) -> str | None:
    """Why ``cider restore`` cannot run as asked (checked before any work), or None."""
    from . import io
    from .errors import CiderError
    from .restore import resolve_device

    suffix = Path(args.output).suffix.lower()
    if args.rl is not None and args.rl < 1:
        return "--rl must be ≥ 1 (RL iterations)"
    if args.rl is not None and args.iterations is not None:
        return "--iterations sets the generator fit, which --rl replaces: give the RL iterations as --rl N"
    if args.rl is not None and args.polish:
        return "--polish continues the generator fit, which --rl replaces: leave --polish out with --rl"
    if args.polish < 0:
        return f"--polish must be ≥ 0 (steps over the voxels after the fit), got {args.polish}"
    if args.ssim_weight is not None and args.ssim_weight < 0:
        return f"--ssim-weight must be ≥ 0, got {args.ssim_weight}"
    if args.iterations is not None and args.iterations < 1:
        return "--iterations must be ≥ 1 (0 would return an untrained generator)"
    if Path(args.output).resolve() == Path(args.input).resolve():
        return f"-o {args.output} is the input file; choose another output path"
    if suffix not in (".tif", ".tiff", ".png", ".npy"):
        return f"-o {args.output}: unsupported output format {suffix!r}; use .tif, .png or .npy"
    try:
        io.check_writable(Path(args.output).parent, f"-o {args.output}")
    except ValueError as err:
        return str(err)
    if args.psf and args.gaussian_sigma is not None:
        return "give --psf FILE or --gaussian-sigma S, not both"
    if args.gaussian_sigma is not None and args.gaussian_sigma <= 0:
        return f"--gaussian-sigma must be > 0 (pixels), got {args.gaussian_sigma}"
    if args.saturation not in ("auto", "none"):
        try:
            float(args.saturation)
        except ValueError:
            return f"--saturation {args.saturation}: give auto, none or a level in the image's units"
    if args.generator_strides == "voxel" and not args.voxel:
        return "--generator-strides voxel follows the voxel size: give the image's --voxel (Z Y X)"
    if args.psf_voxel and not (args.voxel and args.psf):
        return "--psf-voxel is the sampling of a --psf file: give --psf and the image's --voxel too"
    for flag, values in (("--voxel", args.voxel), ("--psf-voxel", args.psf_voxel)):
        if values is not None and (len(values) not in (2, 3) or min(values) <= 0):
            return f"{flag} {' '.join(map(str, values))}: give 2 or 3 positive sizes (µm; Z Y X or Y X)"
    try:
        resolve_device(args.device)
    except CiderError as err:
        return f"--device: {err}"
    return None


def _psf(args: argparse.Namespace) -> int:
    from . import io
    from .psf import gaussian_psf, lightsheet_psf, widefield_psf

    if args.gaussian:
        psf = gaussian_psf(args.gaussian if len(args.gaussian) > 1 else args.gaussian[0], ndim=args.ndim)
    elif args.widefield or args.lightsheet:
        if not (args.na and args.wavelength and args.voxel and args.shape):
            print(
                "cider psf: --widefield/--lightsheet need --na, --wavelength, --voxel and --shape",
                file=sys.stderr,
            )
            return 2
        if args.lightsheet:
            psf = lightsheet_psf(args.shape, args.voxel, args.wavelength, args.na, args.lightsheet)
        else:
            psf = widefield_psf(args.shape, args.voxel, args.wavelength, args.na)
    else:
        print("cider psf: choose --gaussian, --widefield or --lightsheet", file=sys.stderr)
        return 2
    io.write_image(args.output, psf.astype(np.float32))
    print(f"wrote {args.output}: shape {psf.shape}, sum {psf.sum():.6f}")
    return 0


# ``cider train-features`` options: TrainConfig field → help text, other add_argument keywords.
TRAIN_OPTIONS = {
    "steps": ("training steps", {}),
    "seed": ("random seed", {}),
    "threads": ("CPU threads", {}),
    "noise_max": ("largest Gaussian noise σ", {}),
    "kernel_mix": ("shares of the blur kernels", {"nargs": 3, "metavar": ("MOTION", "GAUSSIAN", "DEFOCUS")}),
    "poisson_fraction": ("share of patches with shot noise", {}),
    "photons": (
        "range of the peak photon count of the shot noise (log-uniform)",
        {"nargs": 2, "metavar": ("LOW", "HIGH")},
    ),
    "deconvolution": (
        "deconvolution of the features in training (rl: as at restoration)",
        {"choices": ["wiener", "rl"]},
    ),
    "rl_iterations": ("RL iterations with --deconvolution rl", {}),
}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~cider.training.TrainConfig` that ``cider train-features`` options ask for."""
    values = {field: getattr(args, field) for field in TRAIN_OPTIONS}
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _train(args: argparse.Namespace) -> int:
    import torch

    from . import io
    from .training import train_feature_extractor

    files = sorted(Path(args.data).glob("*.png"))
    if not files:
        print(f"cider train-features: no PNG images in {args.data}", file=sys.stderr)
        return 2
    images = [io.read_image(f).astype(np.float32) / 255.0 for f in files]
    config = train_config(args)
    model, record = train_feature_extractor(images, config, log=lambda line: print(line, flush=True))
    record["data"] = {"folder": Path(args.data).name, "images": len(files)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output)
    output.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"wrote {output} and {output.with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``cider`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="cider", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("restore", help="restore one image or volume (TIFF/PNG/NPY/Zarr)")
    r.add_argument("input", help="image to restore: .tif (2D or a Z stack), .png, .npy or .zarr")
    r.add_argument("-o", "--output", required=True, help="output file: .tif, .png or .npy")
    r.add_argument("--psf", help="PSF file with the same number of axes as the image")
    r.add_argument("--gaussian-sigma", type=float, help="use a Gaussian PSF of this sigma (pixels) instead")
    r.add_argument(
        "--voxel",
        type=float,
        nargs="+",
        metavar="SIZE",
        help="the image's voxel size in µm (Z Y X or Y X): the priors then measure physical "
        "curvature, so z is not the axis smoothed most (light-sheet z steps are 2-5x xy)",
    )
    r.add_argument(
        "--psf-voxel",
        type=float,
        nargs="+",
        metavar="SIZE",
        help="the --psf file's voxel size in µm when it differs from --voxel (it is resampled)",
    )
    r.add_argument(
        "--saturation",
        default="auto",
        metavar="LEVEL",
        help="pixels at or above LEVEL are saturated: lower bounds in the fit, not measurements. "
        "auto (default): an integer image's camera full scale when it reaches it; none: off",
    )
    r.add_argument("--iterations", type=int, help="generator fit iterations (default 3000)")
    r.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    r.add_argument(
        "--background",
        nargs="?",
        const="wavelet",
        choices=("wavelet", "flat"),
        help="remove a background first: wavelet (a smooth background that follows uneven "
        "illumination; the default, but it takes much of faint objects' light) or flat (one level "
        "per image); --fluorescence turns on flat unless this names wavelet",
    )
    r.add_argument(
        "--offset",
        type=float,
        default=0.0,
        help="camera offset (dark level) in the image's units, subtracted first; the output is above it",
    )
    r.add_argument(
        "--fluorescence",
        action="store_true",
        help="bright objects on a dark background: a flat background level removed (--background), the noise-weighted data "
        "term, the variance-stabilised Hessian, keep_best by block and the features_rl10.pt "
        "extractor unless --weights names one (RestoreConfig: FLUORESCENCE)",
    )
    r.add_argument("--sparsity", type=float, default=0.0, help="L1 sparsity weight (fluorescence: ~0.1-1)")
    r.add_argument(
        "--hessian", type=float, help="Hessian smoothness weight (default: RestoreConfig.hessian_weight)"
    )
    r.add_argument(
        "--early-stop", type=int, default=0, metavar="N", help="stop after N iterations without progress"
    )
    r.add_argument(
        "--rl",
        type=int,
        metavar="N",
        help="plain Richardson-Lucy with N iterations instead of CiDeR (the baseline)",
    )
    r.add_argument(
        "--weights",
        help="feature-extractor weights (default: the shipped features.pt; --fluorescence: features_rl10.pt)",
    )
    r.add_argument(
        "--generator-strides",
        choices=("isotropic", "voxel"),
        default="isotropic",
        help="isotropic (default): the generator halves every axis at each level; voxel: only "
        "axes whose spacing is under twice the finest, so a coarse z step keeps its planes "
        "(needs --voxel; RestoreConfig.generator_strides)",
    )
    r.add_argument(
        "--hessian-norm",
        choices=("entries", "frobenius"),  # restore_config.HESSIAN_NORMS (imports torch)
        default="entries",
        help="entries (default): the Hessian prior sums each voxel's absolute second "
        "differences; frobenius: their root sum of squares, the same for any orientation of the "
        "structure (RestoreConfig.hessian_norm)",
    )
    r.add_argument(
        "--ssim-weight",
        type=float,
        help="weight of the SSIM term (default: RestoreConfig.ssim_weight, 1); 0 with --fluorescence "
        "leaves the noise-weighted data term alone, as --polish wants",
    )
    r.add_argument(
        "--polish",
        type=int,
        default=0,
        metavar="N",
        help="after the fit, N steps of the same loss over the voxels (RestoreConfig.polish_iterations; "
        "widefield volumes: --fluorescence --ssim-weight 0 --polish 2000)",
    )
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_restore)

    p = sub.add_parser("psf", help="write a Gaussian, widefield or light-sheet PSF")
    p.add_argument("-o", "--output", required=True, help="output file (.tif or .npy)")
    p.add_argument(
        "--gaussian", type=float, nargs="+", metavar="SIGMA", help="sigma in pixels (one, or one per axis)"
    )
    p.add_argument("--ndim", type=int, default=2, help="dimensions of a Gaussian PSF with one sigma")
    p.add_argument("--widefield", action="store_true", help="Gibson-Lanni widefield PSF (psfmodels)")
    p.add_argument(
        "--lightsheet", type=float, metavar="FWHM_UM", help="light-sheet PSF with this sheet thickness"
    )
    p.add_argument("--na", type=float, help="numerical aperture")
    p.add_argument("--wavelength", type=float, help="emission wavelength in µm")
    p.add_argument("--voxel", type=float, nargs="+", help="voxel size in µm (Z Y X or Y X)")
    p.add_argument("--shape", type=int, nargs="+", help="PSF size in pixels (odd)")
    p.set_defaults(func=_psf)

    t = sub.add_parser("train-features", help="train the feature extractor on natural images")
    t.add_argument("--data", required=True, help="folder of greyscale PNG training images")
    t.add_argument(
        "-o", "--output", required=True, help="weights file to write (.pt); a .json record goes beside it"
    )
    train = TrainConfig()  # the option defaults are the config's: one place to change them
    for field, (text, extra) in TRAIN_OPTIONS.items():
        default = getattr(train, field)
        kind = type(default[0]) if isinstance(default, tuple) else type(default)
        t.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            default=default,
            help=f"{text} (default %(default)s)",
            **extra,
        )
    t.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cider`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"cider {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
