rule features:
    input:
        str(PATHS.prepared()),
        unit_of_tile,
    output:
        temp(str(PATHS.features("{tile}"))),
    log:
        str(LOGS / "features" / "{tile}.log"),
    group:
        "restore"
    conda:
        ENV
    threads: 2
    script:
        "../../scripts/features.py"
