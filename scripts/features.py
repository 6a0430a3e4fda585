"""Rule `features`: deep features of one padded tile, deconvolved with Richardson-Lucy.

Run alone:  python scripts/features.py --config config/config.yaml --tile u000-t00000
"""

from cider.workflow import run_features, script_args

config, wildcards = script_args("features", globals())
run_features(config, wildcards["tile"])
