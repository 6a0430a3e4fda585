"""Rule `stitch`: blend the restored tiles of one input file (all its time points and
channels) with smooth weights that sum to 1; write OME-Zarr (multiscale) and TIFF.

Run alone:  python scripts/stitch.py --config config/config.yaml --name IMAGE_NAME
"""

from cider.workflow import run_stitch, script_args

config, wildcards = script_args("stitch", globals())
run_stitch(config, wildcards["name"])
