rule report:
    input:
        images=[str(PATHS.image(name)) for name in PLAN.names],
        metrics=[str(PATHS.metrics(batch)) for batch in BATCHES],
    output:
        html=str(PATHS.report()),
    log:
        str(LOGS / "report.log"),
    benchmark:
        str(BENCH / "report.tsv")
    localrule: True
    conda:
        ENV
    script:
        "../../scripts/report.py"
