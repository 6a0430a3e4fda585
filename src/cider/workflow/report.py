"""The QC report of a run: the page a facility engineer checks a run by.

What it shows: before/after views of the images (maximum projections for volumes) at
one shared contrast, the loss curves of the tiles, a table of every tile (time, device,
iterations, final loss, χ², flux factor, flags; all of them in ``tiles.csv``) and, per
image, a map of its tiles coloured by their flags (fit still improving, outliers, seams).

Memory is bounded by chunks, never by an image: the "after" view comes from a low level
of the output's OME-Zarr pyramid, the "before" view from a block average of the prepared
input computed chunk by chunk with dask, and seams are measured on thin slabs across
each tile boundary. Nothing is stitched again.
"""

from __future__ import annotations

import csv
import html
import os
import statistics
from pathlib import Path

import numpy as np

from .. import io
from ..tiling import Tile
from .layout import paths
from .plan import Unit, make_plan
from .steps import tile_metrics, unit_array

PREVIEW_SIDE = 512  # longest side of a preview wanted, pixels (the coarsest level that has it)
MOST_VIEWS = 24  # images shown with previews: flagged ones first, then evenly spaced
MOST_ROWS = 500  # tile rows in the page; every tile is in tiles.csv
MOST_CURVES = 200  # loss curves drawn: flagged tiles first, then evenly spaced
SEAM_LIMIT = 1.5  # a tile's boundary gradient ratio (output / input) above this: "seam"
CHI2_OUTLIER = 3.0  # a tile's χ² above this × the run's median: "chi2 outlier"
FLUX_RANGE = (0.8, 1.25)  # a flux factor outside: "flux factor"
STILL_FALLING = 0.01  # loss fell by more than this share of its total fall in the last tenth
COLOURS = {"ok": "#4caf50", "still improving": "#ff9800", "other": "#e53935"}


def still_falling(losses: list[float]) -> bool:
    """True if the loss was still falling at the end: the fit had not converged.

    The loss fell in its last tenth by more than ``STILL_FALLING`` of its whole fall.
    """
    if len(losses) < 10:
        return False
    total = losses[0] - min(losses)
    tail = losses[-max(2, len(losses) // 10)]
    return total > 0 and (tail - losses[-1]) > STILL_FALLING * total


def tile_flags(record: dict, median_chi2: float | None, seam: float | None) -> list[str]:
    """What is suspicious about one tile's fit (empty: nothing)."""
    flags = []
    # Plain RL's χ² falls at every iteration by design; more iterations amplify noise.
    fitted = record.get("method", "cider") == "cider"
    if fitted and record.get("stopped") == "iterations" and still_falling(record.get("loss_history") or []):
        flags.append("still improving")
    chi2 = record.get("chi2")
    if chi2 is not None and median_chi2 and chi2 > CHI2_OUTLIER * median_chi2:
        flags.append("chi2 outlier")
    factor = record.get("flux_factor", 1.0)
    if not FLUX_RANGE[0] <= factor <= FLUX_RANGE[1]:
        flags.append("flux factor")
    if seam is not None and seam > SEAM_LIMIT:
        flags.append("seam")
    return flags


def _zone_and_rest(block: np.ndarray, axis: int, zone: range) -> tuple[float, float]:
    """Mean |difference| along ``axis`` inside the difference indices ``zone``, and outside."""
    steps = np.abs(np.diff(np.asarray(block, dtype=np.float64), axis=axis))
    inside = np.take(steps, list(zone), axis=axis)
    rest = np.delete(steps, list(zone), axis=axis)
    return float(inside.mean()), float(rest.mean()) if rest.size else 0.0


def boundary_seams(before, after, prefix: tuple[int, ...], tiles: list[Tile], blend) -> dict[str, float]:
    """Seam score per tile: how much steeper the output is across the tile's lower core
    boundaries (over the blending ramp, ± ``blend``) than beside them, relative to the same
    ratio in the input (≈ 1: no seam; tiles that disagree give a step over the ramp).

    Reads ``4 × blend + 4`` pixels across each boundary over the tile's core face, from
    ``before`` (the prepared input) and ``after`` (the output's level 0; ``prefix`` its
    time/channel index). Tiles with no inner boundary are left out.
    """
    seams = {}
    shape = before.shape
    for tile in tiles:
        output_sum, input_sum = [0.0, 0.0], [0.0, 0.0]
        for axis, (start, _) in enumerate(tile.core):
            if start == 0:
                continue
            half = blend[axis]
            low, high = max(0, start - 2 * half - 2), min(shape[axis], start + 2 * half + 2)
            zone = range(max(0, start - half - 1 - low), min(high - low - 1, start + half - low))
            window = tuple(slice(low, high) if a == axis else slice(*tile.core[a]) for a in range(len(shape)))
            for sums, array, index in ((output_sum, after, (*prefix, *window)), (input_sum, before, window)):
                inside, rest = _zone_and_rest(array[index], axis, zone)
                sums[0], sums[1] = sums[0] + inside, sums[1] + rest
        if output_sum[1] > 0 and input_sum[1] > 0:
            ratio_out = output_sum[0] / output_sum[1]
            ratio_in = input_sum[0] / input_sum[1]
            seams[tile.id] = ratio_out / max(ratio_in, 1e-12)
    return seams


def _level_for_preview(image) -> str:
    """The coarsest pyramid level whose longest Y/X side still has ``PREVIEW_SIDE`` pixels."""
    levels = sorted((k for k in image.array_keys() if k.isdigit()), key=int)
    for key in reversed(levels):
        if max(image[key].shape[-2:]) >= PREVIEW_SIDE:
            return key
    return levels[0]


def _projection(array, step: tuple[int, ...]) -> np.ndarray:
    """Block average by ``step`` (Y, X), then the maximum over Z: computed chunk by chunk
    into the result (memory: the result and a chunk)."""
    import dask
    import dask.array as da

    lazy = array if isinstance(array, da.Array) else da.from_array(array, chunks=array.chunks)
    full_step = (1,) * (lazy.ndim - 2) + tuple(step)
    if any(s > 1 for s in full_step):
        lazy = io.block_mean(lazy.astype(np.float32), full_step)
    if lazy.ndim == 3:
        lazy = lazy.max(axis=0)
    result = np.empty(lazy.shape, dtype=np.float32)
    with dask.config.set(scheduler="synchronous"):
        da.store(lazy.astype(np.float32), result, lock=False)
    return result


def previews(config: dict, unit: Unit) -> tuple[np.ndarray, np.ndarray, int]:
    """8-bit before/after views of a unit at one shared contrast, and their downsampling.

    After: the coarsest output level with ``PREVIEW_SIDE`` pixels; before: the prepared
    input block-averaged to the same grid. Both are maximum projections over Z for
    volumes and are mapped with one display range (0.5–99.8 % of both together), so
    brightness can be compared between them.
    """
    import dask.array as da
    import zarr

    image = zarr.open_group(str(paths(config).image(unit.name)), mode="r")
    key = _level_for_preview(image)
    level = da.from_zarr(image[key])[unit.index]
    step = tuple(max(1, n // m) for n, m in zip(unit.shape[-2:], level.shape[-2:]))
    after = _projection(level, (1, 1))
    before = _projection(unit_array(config, unit.id), step)[: after.shape[0], : after.shape[1]]
    sample = np.concatenate([before[::2, ::2].ravel(), after[::2, ::2].ravel()])  # display range
    low, high = np.percentile(sample, [0.5, 99.8])
    scale = 255 / max(float(high - low), 1e-12)

    def to_bytes(view: np.ndarray) -> np.ndarray:
        view = view - low
        view *= scale
        return np.clip(view, 0, 255, out=view).astype(np.uint8)

    return to_bytes(before), to_bytes(after), step[-1]


def _tile_map(tiles: list[Tile], flags: dict[str, list[str]], shape, scale: float) -> str:
    """SVG of a unit's tile cores (Y/X footprint; the worst flag over Z), coloured by flag."""
    worst: dict[tuple, str] = {}
    rank = {"ok": 0, "still improving": 1, "other": 2}
    for tile in tiles:
        mark = flags.get(tile.id) or ["ok"]
        level = "still improving" if mark == ["still improving"] else ("ok" if mark == ["ok"] else "other")
        footprint = tuple(tile.core[-2:])
        if rank[level] >= rank[worst.get(footprint, "ok")]:
            worst[footprint] = level
    height, width = (max(1, round(n / scale)) for n in shape[-2:])
    rects = "".join(
        f"<rect x='{x0 / scale:.1f}' y='{y0 / scale:.1f}' width='{(x1 - x0) / scale:.1f}' "
        f"height='{(y1 - y0) / scale:.1f}' fill='{COLOURS[level]}' fill-opacity='0.35' stroke='#333'/>"
        for ((y0, y1), (x0, x1)), level in worst.items()
    )
    return f"<svg width='{width}' height='{height}' style='border:1px solid #999'>{rects}</svg>"


def _curves(records: list[dict], flagged: set[str]) -> str:
    """SVG of loss curves, each scaled to its own range (shape of convergence); flagged red."""
    width, height, lines = 480, 200, []
    for record in _flagged_first(records, [r["tile"] in flagged for r in records], MOST_CURVES):
        losses = np.asarray(record.get("loss_history") or [], dtype=float)
        if losses.size < 2:
            continue
        span = max(float(losses.max() - losses.min()), 1e-12)
        xs = np.linspace(0, width, losses.size)
        ys = height - (losses - losses.min()) / span * height
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
        colour = "#e53935" if record["tile"] in flagged else "#1e88e5"
        lines.append(f"<polyline points='{points}' fill='none' stroke='{colour}' stroke-opacity='0.4'/>")
    return f"<svg width='{width}' height='{height}' style='border:1px solid #999'>{''.join(lines)}</svg>"


def _flagged_first(items: list, flagged: list[bool], most: int) -> list:
    """At most ``most`` of ``items``: the flagged ones first, then others evenly spaced."""
    chosen = [item for item, mark in zip(items, flagged) if mark][:most]
    rest = [item for item, mark in zip(items, flagged) if not mark]
    room = most - len(chosen)
    if room > 0 and rest:
        chosen += [rest[i] for i in sorted(set(np.linspace(0, len(rest) - 1, room).round().astype(int)))]
    return chosen


def _write_table(path: Path, records: list[dict], flags: dict[str, list[str]], seams: dict) -> None:
    columns = (
        "tile unit batch seconds device iterations stopped final_loss chi2 flux_factor seam flags".split()
    )
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in records:
            row = {**record, "device": record.get("device_name", record["device"])}
            row["seam"] = round(seams[record["tile"]], 3) if record["tile"] in seams else ""
            row["flags"] = ";".join(flags.get(record["tile"], []))
            writer.writerow([row.get(c, "") for c in columns])
    os.replace(tmp, path)


def _row(record: dict, flags: list[str], seam: float | None) -> str:
    loss = record.get("final_loss")
    cells = [
        record["tile"],
        record.get("unit", ""),
        record.get("seconds", ""),
        record.get("device_name", record.get("device", "")),
        record.get("iterations", ""),
        record.get("stopped", ""),
        f"{loss:.4f}" if loss is not None else "",
        f"{record['chi2']:.3g}" if record.get("chi2") is not None else "",
        f"{record.get('flux_factor', 1.0):.3f}",
        f"{seam:.2f}" if seam is not None else "",
        ", ".join(flags),
    ]
    style = " style='background:#fde0dc'" if flags else ""
    return f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def run_report(config: dict) -> dict:
    """Write the report (``report/index.html``, ``summary.json``, ``tiles.csv``, previews)."""
    import zarr

    plan, p = make_plan(config), paths(config)
    folder = p.report().parent
    folder.mkdir(parents=True, exist_ok=True)
    records = tile_metrics(config)
    intensity = intensity_records(config)
    chi2s = [r["chi2"] for r in records if r.get("chi2") is not None]
    median_chi2 = statistics.median(chi2s) if chi2s else None
    seams: dict[str, float] = {}
    for unit in plan.units:
        after = zarr.open_group(str(p.image(unit.name)), mode="r")["0"]
        seams |= boundary_seams(
            unit_array(config, unit.id), after, unit.index, plan.tiles_of(unit.id), plan.blend
        )
    flags = {r["tile"]: tile_flags(r, median_chi2, seams.get(r["tile"])) for r in records}
    flags = {tile: found for tile, found in flags.items() if found}
    units = []
    for unit in plan.units:
        unit_seams = [seams[t.id] for t in plan.tiles_of(unit.id) if t.id in seams]
        units.append(
            {
                "unit": unit.id,
                "name": unit.name,
                "index": list(unit.index),
                "shape": list(unit.shape),
                "seam_ratio": float(np.mean(unit_seams)) if unit_seams else 1.0,
                "seam_worst": float(max(unit_seams)) if unit_seams else 1.0,
                "flagged_tiles": [t.id for t in plan.tiles_of(unit.id) if t.id in flags],
            }
            | (
                {"background_level": intensity[unit.id]["background_level"]}
                if "background_level" in intensity.get(unit.id, {})
                else {}
            )
        )
    flagged_units = {u["unit"] for u in units if u["flagged_tiles"]}
    views = []
    for unit in _flagged_first(list(plan.units), [u.id in flagged_units for u in plan.units], MOST_VIEWS):
        before, after, scale = previews(config, unit)
        for kind, view in (("before", before), ("after", after)):
            io.write_image(folder / f"{unit.id}_{kind}.png", view)
        record = next(u for u in units if u["unit"] == unit.id)
        views.append(_view(unit, record, _tile_map(plan.tiles_of(unit.id), flags, unit.shape, scale)))
    _write_table(folder / "tiles.csv", records, flags, seams)
    summary = {
        "dataset": config["name"],
        "tiles": len(records),
        "flagged": flags,
        "units": units,
        "fit_seconds_total": round(sum(r["seconds"] for r in records), 1),
        "devices": sorted({r.get("device_name", r["device"]) for r in records}),
        "outputs": [str(p.image(n)) for n in plan.names],
        "notes": modality_notes(config, intensity)
        + saturation_notes(config, intensity)
        + background_notes(intensity)
        + data_term_notes(config, median_chi2),
    }
    page = _page(config, summary, records, flags, seams, views)
    io.atomic_write_json(folder / "summary.json", summary)
    tmp = p.report().with_suffix(".tmp")
    tmp.write_text(page)
    os.replace(tmp, p.report())
    return summary


def intensity_records(config: dict) -> dict[str, dict]:
    """The background jobs' records of every image, by unit id (groups whose record is
    missing are left out: tiles written without the background job, in tests)."""
    import json

    plan, p = make_plan(config), paths(config)
    records: dict[str, dict] = {}
    for group in sorted({plan.group_of(u.id) for u in plan.units}):
        if p.intensity(group).exists():
            records |= json.loads(p.intensity(group).read_text())["units"]
    return records


def modality_notes(config: dict, intensity: dict[str, dict]) -> list[str]:
    """Warnings when the images do not look like ``restore.modality`` says they are.

    The modality sets the data term and the Hessian's domain; the wrong one costs 1.0-2.9
    dB (bench/README.md, "The data term per modality"). Judged per image by
    :func:`cider.restore_config.looks_like` on the background job's record (``intensity``, from
    :func:`intensity_records`: mean and maximum of the background-free data); none for
    ``restore.method: rl``, which the modality does not change.
    """
    from ..restore_config import looks_like

    restore = config["restore"]
    if restore["method"] == "rl":
        return []
    ratios = {unit_id: (record["mean"], record["scale"]) for unit_id, record in intensity.items()}
    should = "fluorescence" if restore["modality"] == "brightfield" else "brightfield"
    odd = {u: mean / high for u, (mean, high) in ratios.items() if looks_like(mean, high) == should}
    if should == "fluorescence":
        looks, cost = "fluorescence (a dark background)", "1.0-2.4"
    else:
        looks, cost = "bright field (a bright background)", "2.4-2.9"
    if not odd:
        return []
    first = ", ".join(f"{u} {100 * r:.0f} %" for u, r in list(odd.items())[:3])
    return [
        f"{len(odd)} of {len(ratios)} image(s) look like {looks}: mean {first} of the maximum "
        f"(after background removal, if on), but restore.modality is {restore['modality']}. "
        f"On such data the {restore['modality']} settings cost {cost} dB on the benchmarks; "
        f"if this is {should} data, set restore.modality: {should} and rerun the fit jobs."
    ]


def data_term_notes(config: dict, median_chi2: float | None) -> list[str]:
    """A warning when a fit with a data term ends far above χ² = 1 (median over the tiles
    above :data:`cider.restore_config.CHI2_MISFIT`).

    The residual is then not the noise the model expects (a PSF that does not match the
    data, a noise model that does not hold), and the data term fits what the model cannot
    explain: on flowdec bars (χ² 21-38) the fluorescence settings lost 0.8-1.3 dB to the
    brightfield ones, which have no data term (bench/README.md, "As the pipeline runs
    it"). None for plain RL or without a data term.
    """
    from ..restore_config import CHI2_MISFIT

    restore = config["restore"]
    if restore["method"] == "rl" or not restore["data_weight"] or median_chi2 is None:
        return []
    if median_chi2 <= CHI2_MISFIT:
        return []
    return [
        f"the fitted tiles end at a median χ² of {median_chi2:.3g} (about 1 where the model explains the "
        f"data down to its noise) with restore.data_weight {restore['data_weight']:g}: the data term fits "
        "what the PSF or the noise model cannot explain. Check that the PSF was measured or modelled for "
        "this acquisition and sampling, or try restore.data_weight: 0 (on a 3D benchmark whose PSF does "
        "not explain its data, the settings without a data term restored 0.8-1.3 dB better)."
    ]


FLAT_FRACTION_LOW = 0.05  # a flat background level measured on less of an image is doubtful


def background_notes(intensity: dict[str, dict]) -> list[str]:
    """A warning naming the images whose flat background level (``background.method:
    flat``) rests on under :data:`FLAT_FRACTION_LOW` of their pixels: objects (or
    structured background) reach nearly everywhere, so there is little flat background
    left to measure it on."""
    levels = {u: r["background_level"] for u, r in intensity.items() if r.get("background_level")}
    few = {u: level for u, level in levels.items() if level["fraction"] < FLAT_FRACTION_LOW}
    if not few:
        return []
    worst = sorted(few.items(), key=lambda item: item[1]["fraction"])[:3]
    listed = ", ".join(
        f"{u} {100 * level['fraction']:.1f} % (level {level['value']:.4g})" for u, level in worst
    )
    return [
        f"{len(few)} of {len(levels)} image(s) have their flat background level measured on under "
        f"{100 * FLAT_FRACTION_LOW:.0f} % of their pixels ({listed}): objects reach nearly every pixel. "
        "Check the level against a region you know is empty; give a known camera offset "
        "(input.offset) or use background.method wavelet if the background is not flat."
    ]


def saturation_notes(config: dict, intensity: dict[str, dict]) -> list[str]:
    """A warning naming the images whose maximum is a camera's full scale (saturated
    pixels, :func:`cider.workflow.steps.unit_background`'s ``saturated`` record, from
    :func:`intensity_records`)."""
    found = {unit_id: record["saturated"] for unit_id, record in intensity.items() if record.get("saturated")}
    if not found:
        return []
    worst = sorted(found.items(), key=lambda item: -item[1]["count"])[:3]
    listed = ", ".join(f"{u} {s['count']} px at {s['value']:g}" for u, s in worst)
    treated = (
        "the fit took them as lower bounds (input.saturation auto), but their neighbourhoods are "
        "still less certain"
        if config["input"]["saturation"] == "auto"
        else "the fit took them as measured (input.saturation is not auto), so intensities around them "
        "are too low"
    )
    return [
        f"{len(found)} of {len(make_plan(config).units)} image(s) reach the full scale of their camera ({listed}): "
        f"saturated pixels, whose true intensity is unknown; {treated}. For measurements, acquire "
        "with less exposure or gain."
    ]


def _view(unit: Unit, record: dict, tile_map: str) -> str:
    flagged = record["flagged_tiles"]
    return (
        f"<h3>{html.escape(unit.name)} {unit.id} {unit.index}</h3>"
        f"<p>seam score mean {record['seam_ratio']:.2f}, worst {record['seam_worst']:.2f} "
        f"(gradient across tile boundaries relative to the input's; ≈ 1: no seam); "
        f"{len(flagged)} flagged tile(s){': ' + ', '.join(flagged[:20]) if flagged else ''}</p>"
        f"<div style='display:flex;gap:8px;align-items:flex-start'>"
        f"<figure><img src='{unit.id}_before.png'><figcaption>before</figcaption></figure>"
        f"<figure><img src='{unit.id}_after.png'><figcaption>after</figcaption></figure>"
        f"<figure>{tile_map}<figcaption>tiles</figcaption></figure></div>"
    )


def _settings_line(config: dict) -> str:
    """The restore settings a reader checks first: method, modality and what it set."""
    r = config["restore"]
    if r["method"] == "rl":
        return f"restore.method rl: plain Richardson–Lucy, {r['rl_iterations']} iterations per tile"
    return (
        f"restore.method cider, modality {r['modality']} (data_weight {r['data_weight']:g}, "
        f"hessian_domain {r['hessian_domain']}, keep_best_by {r['keep_best_by']}), "
        f"{r['iterations']} iterations per tile; "
        "every setting is in the output's provenance"
    )


def _page(config, summary, records, flags, seams, views) -> str:
    flagged = set(flags)
    ordered = [r for r in records if r["tile"] in flagged] + [r for r in records if r["tile"] not in flagged]
    rows = "".join(_row(r, flags.get(r["tile"], []), seams.get(r["tile"])) for r in ordered[:MOST_ROWS])
    more = f"<p>{len(records) - MOST_ROWS} more rows in tiles.csv</p>" if len(records) > MOST_ROWS else ""
    titles = ("tile", "unit", "seconds", "device", "iterations", "stopped", "final loss", "χ²", "flux factor")
    header = "".join(f"<th>{c}</th>" for c in (*titles, "seam", "flags"))
    legend = " ".join(
        f"<span style='background:{colour};opacity:0.6'>&nbsp;{name}&nbsp;</span>"
        for name, colour in COLOURS.items()
    )
    name = html.escape(config["name"])
    curves_note = (
        "<p>restore.method rl: plain Richardson–Lucy; each curve is the χ² of its iterations.</p>"
        if config["restore"]["method"] == "rl"
        else ""
    )
    checks = "".join(
        f"<p style='background:#ffe0b2'><b>Check:</b> {html.escape(n)}</p>" for n in summary["notes"]
    )
    return (
        f"<html><head><meta charset='utf-8'><title>cider report: {name}</title></head><body>"
        f"<h1>cider report: {name}</h1>"
        f"<p>{summary['tiles']} tiles, {len(flags)} flagged; {summary['fit_seconds_total']} s of fitting on "
        f"{html.escape(', '.join(summary['devices']))}. Outputs: {html.escape(', '.join(summary['outputs']))}</p>"
        f"<p>{html.escape(_settings_line(config))}</p>{checks}"
        f"<p>Flags: <b>still improving</b> (the loss fell by more than {STILL_FALLING:.0%} of its total in the "
        f"last tenth of the iterations: more restore.iterations may help), <b>chi2 outlier</b> (χ² above "
        f"{CHI2_OUTLIER:g}× the run's median), <b>flux factor</b> (outside {FLUX_RANGE[0]}–{FLUX_RANGE[1]}), "
        f"<b>seam</b> (gradient ratio across the tile's boundaries above {SEAM_LIMIT:g}× the input's).</p>"
        f"<h2>Before / after (maximum projection for volumes; one contrast for both)</h2>"
        f"<p>Tile maps: {legend}</p>{''.join(views)}"
        f"<h2>Loss curves (each scaled to its own range; flagged tiles red)</h2>{curves_note}"
        f"{_curves(records, flagged)}"
        f"<h2>Tiles (flagged first; all in <a href='tiles.csv'>tiles.csv</a>)</h2>"
        f"<table border=1 cellspacing=0><tr>{header}</tr>{rows}</table>{more}</body></html>"
    )
