# The GPU step. GPU, runtime, memory, retries and how many tiles share one cluster job
# (group-components for group "restore") are set in profiles/*/config.yaml.
rule fit:
    input:
        str(PATHS.features("{tile}")),
        unit_of_tile,
    output:
        tile=str(PATHS.tile("{tile}")),
        metrics=str(PATHS.metrics("{tile}")),
    log:
        str(LOGS / "fit" / "{tile}.log"),
    group:
        "restore"
    conda:
        ENV
    threads: 2
    script:
        "../../scripts/fit.py"
