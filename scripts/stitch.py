"""Rule `stitch`: blend the restored tiles of each input file of one part (all its time
points and channels) with smooth weights that sum to 1; write OME-Zarr (multiscale) and
TIFF, then the part's record of the files written.

Run alone:  python scripts/stitch.py --config config/config.yaml --part p0
"""

from cider.workflow import run_stitch, script_args

config, wildcards = script_args("stitch", globals())
record = run_stitch(config, wildcards["part"])
print(f"stitched {len(record['images'])} image(s) of part {record['part']}")
