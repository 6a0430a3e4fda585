"""Rule `background`: estimate the wavelet background of each whole image (unit) of one
group once, so that all its tiles subtract the same smooth background, and record each
image's intensity range, noise model and feature range.

Run alone:  python scripts/background.py --config config/config.yaml --group g0
"""

from cider.workflow import run_background, script_args

config, wildcards = script_args("background", globals())
run_background(config, wildcards["group"])
