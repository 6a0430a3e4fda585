"""Where a run's files live (work and output folders), reading the background job's
records, and the stitch records' upkeep."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """Where every file of a run lives."""

    output: Path
    work: Path

    def input_zarr(self) -> Path:
        return self.work / "input.zarr"

    def prepared(self) -> Path:
        return self.work / "prepared.json"

    def plan(self) -> Path:
        """The tile plan, written once (see :func:`cider.workflow.plan.make_plan`)."""
        return self.work / "plan.json"

    def background(self, group: str) -> Path:
        """Wavelet backgrounds of a group's units (Zarr group, one array per unit id)."""
        return self.work / "background" / f"{group}.zarr"

    def intensity(self, group: str) -> Path:
        """Intensity scale, noise model and feature range of a group's units, by unit id."""
        return self.work / "background" / f"{group}.json"

    def tiles(self, batch: str) -> Path:
        """Restored padded tiles of one batch, one array per tile id."""
        return self.work / "tiles" / f"{batch}.npz"

    def metrics(self, batch: str) -> Path:
        """Fit metrics of one batch's tiles."""
        return self.work / "metrics" / f"{batch}.json"

    def stitched(self, part: str) -> Path:
        """What one ``stitch`` job wrote (its images and TIFFs): its Snakemake output."""
        return self.work / "stitched" / f"{part}.json"

    def image(self, name: str) -> Path:
        return self.output / f"{name}.ome.zarr"

    def tiff(self, name: str) -> Path:
        return self.output / f"{name}.tif"

    def report(self) -> Path:
        return self.output / "report" / "index.html"


def paths(config: dict) -> Paths:
    output = Path(config["output_dir"])
    return Paths(output, Path(config.get("work_dir") or output / "work"))


@lru_cache(maxsize=4)
def intensity_records(path: str) -> dict:
    """The background job's records of a group's units (:meth:`Paths.intensity`), by unit
    id; read once per job."""
    return json.loads(Path(path).read_text())["units"]


def drop_stale_manifests(run: Paths, part_ids: Sequence[str]) -> list[str]:
    """Remove the stitch records whose images (or TIFFs) are no longer all there.

    A ``stitch`` job's Snakemake output is its record (``work/stitched/{part}.json``), not
    the images it lists, so that one job can write many images. A record whose files were
    deleted or moved is removed here, and Snakemake then stitches that part again.

    Returns
    -------
    list[str]
        The ids of the parts whose records were removed.
    """
    dropped = []
    for part in part_ids:
        record = run.stitched(part)
        if not record.exists():
            continue
        try:
            files = [f for entry in json.loads(record.read_text())["images"].values() for f in entry["files"]]
        except (OSError, ValueError, KeyError):
            files = [str(record / "unreadable")]
        if not all(os.path.exists(f) for f in files):
            record.unlink()
            dropped.append(part)
    return dropped
