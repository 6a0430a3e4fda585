"""Rule `background`: estimate the wavelet background of one whole image (unit) once, so
that all its tiles subtract the same smooth background, and record its intensity range.

Run alone:  python scripts/background.py --config config/config.yaml --unit u000
"""

from cider.workflow import run_background, script_args

config, wildcards = script_args("background", globals())
run_background(config, wildcards["unit"])
