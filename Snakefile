# cider-pipeline: restore a large microscopy acquisition tile by tile with CiDeR.
# Run:  snakemake --profile profiles/local                 (demo, this machine)
#       snakemake --profile profiles/slurm --configfile config/datasets/X.yaml
# The rules live in workflow/rules; every rule script in scripts/ can run alone.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/background.smk"
include: "workflow/rules/fit.smk"
include: "workflow/rules/stitch.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        report=str(PATHS.report()),
