# The QC page of the run (report/index.html, summary.json, tiles.csv): reads the outputs'
# low pyramid levels and thin slabs across tile boundaries, so it runs as a normal
# (cluster) job in bounded memory.
rule report:
    input:
        stitched=[str(PATHS.stitched(part)) for part in PARTS],
        metrics=[str(PATHS.metrics(batch)) for batch in BATCHES],
    output:
        html=str(PATHS.report()),
    log:
        str(LOGS / "report.log"),
    benchmark:
        str(BENCH / "report.tsv")
    conda:
        ENV
    resources:
        mem_mb=4000,
    script:
        "../../scripts/report.py"
