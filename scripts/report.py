"""Rule `report`: QC summary (per-tile metrics, before/after views, sharpness, seams).

Run alone:  python scripts/report.py --config config/config.yaml
"""

from cider.workflow import paths, run_report, script_args

config, _ = script_args("report", globals())
summary = run_report(config)
print(f"restored: {', '.join(summary['outputs'])}")
print(f"report:   {paths(config).report()}")
