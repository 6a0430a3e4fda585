"""Rule `seed` (with fit.warm_start): fit the seed tile with restore.iterations and write
its generator's weights (work/seed/generator.pt), every fit job's warm start.

Run alone:  python scripts/seed.py --config config/config.yaml
"""

import json

from cider.workflow import run_seed, script_args

config, _ = script_args("seed", globals())
print(json.dumps(run_seed(config)))
