"""Rule `prepare`: copy every input image (each time point/channel) into one Zarr store
chunked on the tile grid, and write prepared.json (units, tiles, PSF size, margin).

Run alone:  python scripts/prepare.py --config config/config.yaml
"""

from cider.workflow import run_prepare, script_args

config, _ = script_args("prepare", globals())
run_prepare(config)
