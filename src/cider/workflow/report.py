"""The QC report of a run: per-tile metrics, before/after previews, sharpness and seams."""

from __future__ import annotations

import os

import numpy as np

from .. import io
from ..tiling import Tile, stitch
from .plan import make_plan, paths
from .steps import TileReader, tile_metrics, unit_array


def sharpness(image: np.ndarray) -> float:
    """Mean absolute Laplacian over the 1–99.9 % intensity span: higher is sharper."""
    image = np.asarray(image, dtype=np.float64)
    low, high = np.percentile(image, [1, 99.9])
    lap = sum(np.diff(image, 2, axis=a)[tuple(slice(1, -1) if b != a else slice(None) for b in range(image.ndim))]
              for a in range(image.ndim))  # fmt: skip
    return float(np.abs(lap).mean() / max(high - low, 1e-12))


def seam_score(image: np.ndarray, tiles: list[Tile]) -> float:
    """Mean |gradient| across inner core boundaries over the mean |gradient| elsewhere (≈ 1: no seams)."""
    image = np.asarray(image, dtype=np.float64)
    at_seam, total, count_seam, count = 0.0, 0.0, 0, 0
    for axis in range(image.ndim):
        grad = np.abs(np.diff(image, axis=axis))
        cuts = sorted({t.core[axis][0] for t in tiles if t.core[axis][0] > 0})
        seam = np.take(grad, [c - 1 for c in cuts], axis=axis) if cuts else np.zeros(0)
        at_seam, count_seam = at_seam + seam.sum(), count_seam + seam.size
        total, count = total + grad.sum(), count + grad.size
    if not count_seam:
        return 1.0
    return float((at_seam / count_seam) / (total / count))


def _preview(image: np.ndarray) -> np.ndarray:
    plane = image.max(axis=0) if image.ndim == 3 else image
    low, high = np.percentile(plane, [0.5, 99.8])
    return np.clip((plane - low) / max(high - low, 1e-12) * 255, 0, 255).astype(np.uint8)


def run_report(config: dict) -> dict:
    """QC summary: per-tile metrics table, before/after previews, sharpness and seam scores."""
    plan, p = make_plan(config), paths(config)
    folder = p.report().parent
    folder.mkdir(parents=True, exist_ok=True)
    metrics = tile_metrics(config)
    read_tile = TileReader(config)
    units = []
    for unit in plan.units:
        before = np.asarray(unit_array(config, unit.id)[...])
        after = stitch(plan.tiles_of(unit.id), read_tile, unit.shape, plan.blend)
        for kind, image in (("before", before), ("after", after)):
            io.write_image(folder / f"{unit.id}_{kind}.png", _preview(image))
        units.append({"unit": unit.id, "name": unit.name, "index": list(unit.index), "shape": list(unit.shape),
                      "sharpness_before": sharpness(before), "sharpness_after": sharpness(after),
                      "seam_ratio": seam_score(after, plan.tiles_of(unit.id))
                      / max(seam_score(before, plan.tiles_of(unit.id)), 1e-12)})  # fmt: skip
    summary = {"dataset": config["name"], "tiles": len(metrics), "units": units,
               "fit_seconds_total": round(sum(m["seconds"] for m in metrics), 1),
               "devices": sorted({m.get("device_name", m["device"]) for m in metrics}),
               "outputs": [str(p.image(n)) for n in plan.names]}  # fmt: skip
    rows = "".join(
        f"<tr><td>{m['tile']}</td><td>{m['iterations']}</td><td>{m['final_loss']:.4f}</td>"
        f"<td>{m['seconds']}</td><td>{m.get('device_name', m['device'])}</td></tr>"
        for m in metrics
    )
    views = "".join(
        f"<h3>{u['name']} {u['unit']} {u['index']}</h3><p>sharpness {u['sharpness_before']:.4f} → "
        f"{u['sharpness_after']:.4f}; seam ratio {u['seam_ratio']:.2f} (gradient across tile "
        "boundaries relative to the input's; ≤ 1: no seams added)</p>"
        f"<img src='{u['unit']}_before.png' width=300> <img src='{u['unit']}_after.png' width=300>"
        for u in units
    )
    html = (f"<html><head><meta charset='utf-8'><title>cider report: {config['name']}</title></head><body>"
            f"<h1>cider report: {config['name']}</h1><p>{len(metrics)} tiles, {summary['fit_seconds_total']} s of "
            f"fitting on {', '.join(summary['devices'])}. Outputs: {', '.join(summary['outputs'])}</p>"
            f"<h2>Before / after (max projection for volumes)</h2>{views}<h2>Tiles</h2><table border=1>"
            f"<tr><th>tile</th><th>iterations</th><th>final loss</th><th>seconds</th><th>device</th></tr>{rows}"
            "</table></body></html>")  # fmt: skip
    io.atomic_write_json(folder / "summary.json", summary)
    tmp = p.report().with_suffix(".tmp")
    tmp.write_text(html)
    os.replace(tmp, p.report())
    return summary
