# cider-pipeline: restore a large microscopy acquisition tile by tile with CiDeR.
# Run:  snakemake --profile profiles/local                 (demo, this machine)
#       snakemake --profile profiles/slurm --configfile config/datasets/X.yaml
# A dataset config stands alone (schema defaults fill what it omits); the demo config is
# the local profile's default configfile, never merged under a dataset's.
# The rules live in workflow/rules; every rule script in scripts/ can run alone.


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/background.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/stitch.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        stitched=[str(PATHS.stitched(part)) for part in PARTS],
        report=str(PATHS.report()),
