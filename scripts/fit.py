"""Rule `fit`: features, RL and the batched generator fit of one batch of tiles (one
pass per tile shape); writes the restored padded tiles (one .npz per batch) and their metrics JSON
(loss history, iterations, seconds, device). Both appear only when complete.

Run alone:  python scripts/fit.py --config config/config.yaml --batch b0
"""

import json

from cider.workflow import run_fit, script_args

config, wildcards = script_args("fit", globals())
record = run_fit(config, wildcards["batch"])
print(json.dumps({k: record[k] for k in ("batch", "batch_size", "passes", "seconds", "device")}))
