"""Fitting throughput: B same-shape tiles fitted one at a time vs together in one batch.

    python bench/throughput.py                  # CPU here, or the GPU when one is present
    python bench/throughput.py --quick          # fewer iterations (a smoke run)

For every case (2D tiles of 64, 128, 256 px; a small 3D tile), B noisy tiles of a
synthetic fluorescence scene (blobs + beads, Poisson noise, Gaussian PSF) are fitted

- one at a time (``fit_generator``, what a job did before batching), and
- together (``fit_generators``: one forward pass for all B generators),

with the same settings and seeds (on a CPU, ``fit_generators`` batches only small
members, see ``cider.fitting.CPU_BATCH_VOXELS``; ``speedup_one_batch`` is the time of one
batch of all B regardless). Reported: tiles per second and voxel-iterations per
second of both, ``speedup`` (batched ÷ sequential tiles per second), the PSNR of every
member against its truth, ``quality_diff_db`` (largest |PSNR batched − PSNR sequential|),
and, as the yardstick for that difference, ``rounding_diff_db``: the same difference
between two *sequential* fits whose input differs by 1e-7 relative (float32 rounding).
The fit amplifies rounding (NAdam turns tiny gradients into learning-rate-sized steps),
so batched and sequential fits agree to this yardstick, not bit for bit; in float64 they
agree to 1e-7 (``tests/test_batched_fit.py``).

With ``restore.compile`` (on a GPU always, on a CPU with ``--compile``): the compiled batch,
float32 and bf16, with its compilation timed apart (``compiled_*`` keys).

Memory: the bytes of the activations autograd keeps for the backward pass of one
batched forward (``cider.memory.activation_bytes``, traced on the ``meta`` device), and
on CUDA the measured peak (``torch.cuda.max_memory_allocated``).
``--estimate-only`` prints the traced activation memory of a large 3D tile without
fitting (on the ``meta`` device: no memory is allocated).

Writes ``bench/results/throughput.json`` and ``bench/results/throughput.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import cider.fitting  # noqa: E402
from cider.fitting import fit_generator, fit_generators  # noqa: E402
from cider.memory import activation_bytes  # noqa: E402
from cider.psf import gaussian_psf  # noqa: E402
from cider.restore import RestoreConfig, crop_to_image, deconvolved_features, prepare  # noqa: E402
from cider.rl import BlurOperator  # noqa: E402

# name, tile shape, PSF sigma, batch size, iterations (full run)
CASES = [
    ("2d-64", (64, 64), 1.5, 8, 40),
    ("2d-128", (128, 128), 1.5, 8, 20),
    ("2d-256", (256, 256), 1.5, 4, 10),
    ("3d-16x48x48", (16, 48, 48), (1.5, 1.0, 1.0), 4, 6),
]
# On a GPU: the batches a GPU job packs (fit.batch_size up to jobs.images_per_job), and a
# large light-sheet-like 3D tile; float32 and bfloat16 (``RestoreConfig.precision``).
GPU_CASES = [
    ("2d-64", (64, 64), 1.5, 64, 100),
    ("2d-128", (128, 128), 1.5, 32, 100),
    ("2d-256", (256, 256), 1.5, 16, 60),
    ("3d-16x48x48", (16, 48, 48), (1.5, 1.0, 1.0), 16, 60),
    ("3d-64x192x192", (64, 192, 192), (2.0, 1.2, 1.2), 2, 20),
]
# Sequential fits timed on the GPU (tiles/s extrapolates; quality compares these members)
GPU_SEQUENTIAL = 4


def scene(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Blobs and beads on a dim background, peak ≈ 1."""
    from scipy.ndimage import gaussian_filter

    x = np.zeros(shape)
    for _ in range(int(np.prod(shape) / 400) + 3):
        centre = tuple(rng.integers(0, n) for n in shape)
        x[centre] += rng.uniform(0.5, 1.0)
    x = gaussian_filter(x, 0.7) * 8 + gaussian_filter(rng.random(shape), 4) * 0.3
    return x / x.max()


def make_tiles(shape, sigma, count, seed=0, photons=200.0):
    """``count`` noisy tiles (valid blur of a larger truth) with their truths."""
    rng = np.random.default_rng(seed)
    psf = gaussian_psf(sigma, ndim=len(shape))
    tiles = []
    for _ in range(count):
        big = tuple(n + k - 1 for n, k in zip(shape, psf.shape))
        truth = scene(big, rng)
        blurred = BlurOperator(torch.tensor(psf), shape, "valid")(torch.tensor(truth)).numpy()
        noisy = rng.poisson(np.clip(blurred, 0, None) * photons).astype(np.float64)
        tiles.append((noisy, truth, psf))
    return tiles


def psnr_against(estimate: torch.Tensor, truth: np.ndarray, psf_shape) -> float:
    """PSNR on the image's field of view after a least-squares intensity fit."""
    x = crop_to_image(estimate, psf_shape).cpu().double().numpy().ravel()
    t = crop_to_image(torch.tensor(truth), psf_shape).numpy().ravel()
    a = np.vstack([x, np.ones_like(x)]).T
    fitted = a @ np.linalg.lstsq(a, t, rcond=None)[0]
    return float(10 * np.log10(np.ptp(t) ** 2 / np.mean((fitted - t) ** 2)))


def _time(function) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def compiled_rows(features, prepared, config, truths, psf_shape, bat_seconds, psnr_bat) -> dict:
    """The batch with ``restore.compile`` (float32, and bf16 + compile: the issue's fastest
    combination), against the uncompiled float32 batch; the compilation is timed apart (a
    two-iteration fit compiles the batch's shape, the timed fit reuses it)."""
    rows = {}
    for key, settings in (
        ("compiled", replace(config, compile=True)),
        ("bf16_compiled", replace(config, compile=True, precision="bfloat16")),
    ):
        compile_seconds, _ = _time(
            lambda s=settings: fit_generators(features, prepared, replace(s, iterations=2))
        )
        seconds, fits = _time(lambda s=settings: fit_generators(features, prepared, s))
        psnr = [psnr_against(f.estimate, t, psf_shape) for f, t in zip(fits, truths)]
        rows |= {
            f"{key}_compile_seconds": round(compile_seconds, 1),
            f"{key}_batched_tiles_per_s": round(len(fits) / seconds, 4),
            f"{key}_speedup_over_float32_batched": round(bat_seconds / seconds, 3),
            f"{key}_mean_psnr_diff_db": round(float(np.mean(psnr) - np.mean(psnr_bat)), 4),
        }
    return rows


def run_case(name, shape, sigma, batch, iterations, device, gpu_rows=False, compile_rows=False) -> dict:
    config = RestoreConfig(iterations=iterations, device=device, log_every=max(1, iterations // 2))
    tiles = make_tiles(shape, sigma, batch)
    prepared = [prepare(noisy, psf, config) for noisy, _, psf in tiles]
    features = [deconvolved_features(p, config) for p in prepared]
    psf_shape = prepared[0].psf.shape
    # on a GPU, time GPU_SEQUENTIAL members one at a time (tiles/s extrapolates)
    n_seq = batch if device == "cpu" and not gpu_rows else min(batch, GPU_SEQUENTIAL)
    fit_generator(features[0], prepared[0], replace(config, iterations=2))  # warm-up
    fit_generators(features, prepared, replace(config, iterations=2))
    seq_seconds, sequential = _time(
        lambda: [fit_generator(f, p, config) for f, p in zip(features[:n_seq], prepared[:n_seq])]
    )
    seq_seconds *= batch / n_seq
    bat_seconds, batched = _time(lambda: fit_generators(features, prepared, config))
    one_batch_seconds = bat_seconds
    if device == "cpu":  # the CPU chunks big members; measure the single batch too
        default, cider.fitting.CPU_BATCH_VOXELS = cider.fitting.CPU_BATCH_VOXELS, 10**12
        one_batch_seconds, _ = _time(lambda: fit_generators(features, prepared, config))
        cider.fitting.CPU_BATCH_VOXELS = default
    perturbed = [
        fit_generator(f * (1 + 1e-7 * torch.randn_like(f)), p, config)
        for f, p in zip(features[:n_seq], prepared[:n_seq])
    ]
    truths = [truth for _, truth, _ in tiles]
    psnr_seq = [psnr_against(f.estimate, t, psf_shape) for f, t in zip(sequential, truths)]
    psnr_bat = [psnr_against(f.estimate, t, psf_shape) for f, t in zip(batched, truths)]
    psnr_pert = [psnr_against(f.estimate, t, psf_shape) for f, t in zip(perturbed, truths)]
    low = {}
    if device != "cpu" or gpu_rows:  # the bfloat16 generator body, batched
        bf16 = replace(config, precision="bfloat16")
        fit_generators(features, prepared, replace(bf16, iterations=2))  # warm-up
        low_seconds, low_fits = _time(lambda: fit_generators(features, prepared, bf16))
        psnr_low = [psnr_against(f.estimate, t, psf_shape) for f, t in zip(low_fits, truths)]
        low = {
            "bf16_batched_seconds": round(low_seconds, 3),
            "bf16_batched_tiles_per_s": round(batch / low_seconds, 4),
            "bf16_speedup_over_float32_batched": round(bat_seconds / low_seconds, 3),
            "bf16_speedup": round(seq_seconds / low_seconds, 3),
            "psnr_bf16": [round(v, 3) for v in psnr_low],
            "bf16_quality_diff_db": round(max(abs(a - b) for a, b in zip(psnr_bat, psnr_low)), 4),
            "bf16_mean_psnr_diff_db": round(float(np.mean(psnr_low) - np.mean(psnr_bat)), 4),
        }
    if device != "cpu" or compile_rows:
        low.update(compiled_rows(features, prepared, config, truths, psf_shape, bat_seconds, psnr_bat))
    voxels = int(np.prod(features[0].shape[1:]))
    result = {
        "case": name,
        "tile_shape": list(shape),
        "object_shape": list(features[0].shape[1:]),
        "batch": batch,
        "iterations": iterations,
        "sequential_seconds": round(seq_seconds, 3),
        "batched_seconds": round(bat_seconds, 3),
        "sequential_tiles_per_s": round(batch / seq_seconds, 4),
        "batched_tiles_per_s": round(batch / bat_seconds, 4),
        "sequential_voxel_iterations_per_s": round(batch * voxels * iterations / seq_seconds),
        "batched_voxel_iterations_per_s": round(batch * voxels * iterations / bat_seconds),
        "speedup": round(seq_seconds / bat_seconds, 3),
        "speedup_one_batch": round(seq_seconds / one_batch_seconds, 3),
        "psnr_sequential": [round(v, 3) for v in psnr_seq],
        "psnr_batched": [round(v, 3) for v in psnr_bat],
        "sequential_members_timed": n_seq,
        "quality_diff_db": round(max(abs(a - b) for a, b in zip(psnr_seq, psnr_bat)), 4),
        "rounding_diff_db": round(max(abs(a - b) for a, b in zip(psnr_seq, psnr_pert)), 4),
        "saved_activation_mib_batch1": round(activation_bytes(features[0].shape[1:], 1) / 2**20, 1),
        "saved_activation_mib_batched": round(activation_bytes(features[0].shape[1:], batch) / 2**20, 1),
        **low,
    }
    if device != "cpu":
        for key, settings in (("", config), ("_bf16", replace(config, precision="bfloat16"))):
            torch.cuda.reset_peak_memory_stats()
            fit_generators(features, prepared, replace(settings, iterations=2))
            result[f"cuda_peak_mib_batched{key}"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _bf16_row(r: dict) -> str:
    return (
        f"| {r['case']} | {r['batch']} | {r['bf16_batched_tiles_per_s']} | **{r['bf16_speedup']}×** | "
        f"{r['bf16_speedup_over_float32_batched']}× | {r['bf16_mean_psnr_diff_db']} | "
        f"{r['bf16_quality_diff_db']} | {r.get('cuda_peak_mib_batched', '–')} / "
        f"{r.get('cuda_peak_mib_batched_bf16', '–')} |"
    )


def _compiled_row(r: dict) -> str:
    return (
        f"| {r['case']} | {r['batch']} | {r['compiled_compile_seconds']} | "
        f"{r['compiled_batched_tiles_per_s']} | **{r['compiled_speedup_over_float32_batched']}×** | "
        f"{r['compiled_mean_psnr_diff_db']} | {r['bf16_compiled_compile_seconds']} | "
        f"{r['bf16_compiled_batched_tiles_per_s']} | "
        f"**{r['bf16_compiled_speedup_over_float32_batched']}×** | {r['bf16_compiled_mean_psnr_diff_db']} |"
    )


# The tables after the main one: (a key the case's row has, caption, header, row)
EXTRA_TABLES = [
    (
        "bf16_speedup",
        "bfloat16 generator body (`restore.precision: bfloat16`), batched, against "
        "float32 one at a time (`speedup`) and float32 batched; quality: mean PSNR difference to "
        "float32 batched (negative = bf16 worse) and the largest per-member |difference|.",
        "case | B | bf16 batched tiles/s | speedup over sequential float32 | over batched float32 "
        "| mean PSNR diff (dB) | largest diff (dB) | peak MiB float32 / bf16",
        _bf16_row,
    ),
    (
        "compiled_batched_tiles_per_s",
        "`restore.compile` (torch.compile, inductor), batched, against the uncompiled float32 "
        "batch: the compilation (a two-iteration fit of the batch) and the speed after it; "
        "quality: mean PSNR difference to the uncompiled float32 batch.",
        "case | B | compile s | compiled tiles/s | over batched float32 | PSNR diff (dB) "
        "| bf16 + compile: compile s | tiles/s | over batched float32 | PSNR diff (dB)",
        _compiled_row,
    ),
]


def _section(caption: str, header: str, rows: list[str]) -> list[str]:
    """A captioned markdown table; ``header`` is the column names joined by " | "."""
    return ["", caption, "", f"| {header} |", "|" + "---|" * len(header.split(" | ")), *rows]


def markdown(results: dict) -> str:
    lines = [
        f"# Fitting throughput — {results['device']}",
        "",
        "Generated by `bench/throughput.py`; B tiles fitted one at a time vs in one batch, same "
        "settings and seeds. Tiles/s at the stated iterations (a full fit has 3000). `rounding` = "
        "the PSNR difference two sequential fits show when their input differs by 1e-7 "
        "(float32 rounding): the yardstick for `quality diff`.",
        "",
        "| case | B | iterations | sequential tiles/s | batched tiles/s | speedup | one batch of B "
        "| batched voxel-it/s | quality diff (dB) | rounding (dB) | saved activations B=1 / B (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["cases"]:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['iterations']} | {r['sequential_tiles_per_s']} | "
            f"{r['batched_tiles_per_s']} | **{r['speedup']}×** | {r['speedup_one_batch']}× | "
            f"{r['batched_voxel_iterations_per_s']:.3g} | "
            f"{r['quality_diff_db']} | {r['rounding_diff_db']} | {r['saved_activation_mib_batch1']} / "
            f"{r['saved_activation_mib_batched']} |"
        )
    for key, caption, header, row in EXTRA_TABLES:
        chosen = [r for r in results["cases"] if key in r]
        if chosen:
            lines += _section(caption, header, [row(r) for r in chosen])
    if results.get("large_3d_estimate"):
        e = results["large_3d_estimate"]
        lines += [
            "",
            f"Traced activation memory of one {e['object_shape']} 3D tile (meta device, no fit): "
            f"**{e['saved_activation_gib']} GiB** (float32, batch 1).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--gpu-cases", action="store_true", help="the GPU case list on any device (smoke test)"
    )
    parser.add_argument("--only", nargs="+", help="only these cases")
    parser.add_argument(
        "--compile", action="store_true", help="time restore.compile on a CPU too (on a GPU always)"
    )
    parser.add_argument("--estimate-only", action="store_true", help="only the large-3D-tile memory estimate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large = (124 + 8, 346 + 8, 346 + 8)
    estimate = {
        "object_shape": list(large),
        "saved_activation_gib": round(activation_bytes(large) / 2**30, 2),
    }
    if args.estimate_only:
        print(json.dumps(estimate))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = []
    for name, shape, sigma, batch, iterations in GPU_CASES if device != "cpu" or args.gpu_cases else CASES:
        if args.only and name not in args.only:
            continue
        its = max(2, iterations // 4) if args.quick else iterations
        cases.append(run_case(name, shape, sigma, batch, its, device, args.gpu_cases, args.compile))
        print(json.dumps(cases[-1]), flush=True)
        write(cases, estimate, args.out, device, args.gpu_cases or bool(args.only))  # after every case


def write(cases: list[dict], estimate: dict, out: Path, device: str, smoke: bool) -> None:
    """``throughput[_gpu|_smoke].{json,md}`` in ``out``."""
    results = {
        "device": device_name(),
        "torch": torch.__version__,
        "cases": cases,
        "speedup": {c["case"]: c["speedup"] for c in cases},
        "quality_diff_db": max(c["quality_diff_db"] for c in cases),
        "large_3d_estimate": estimate,
    }
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_gpu" if device != "cpu" else "_smoke" if smoke else ""
    (out / f"throughput{suffix}.json").write_text(json.dumps(results, indent=2))
    (out / f"throughput{suffix}.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
