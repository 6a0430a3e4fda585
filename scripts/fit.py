"""Rule `fit`: fit the generator on one tile; write the restored padded tile and a
metrics JSON (loss history, iterations, seconds, device). Both appear only when complete.

Run alone:  python scripts/fit.py --config config/config.yaml --tile u000-t00000
"""

import json

from cider.workflow import run_fit, script_args

config, wildcards = script_args("fit", globals())
metrics = run_fit(config, wildcards["tile"])
print(json.dumps({k: metrics[k] for k in ("tile", "iterations", "final_loss", "seconds", "device")}))
