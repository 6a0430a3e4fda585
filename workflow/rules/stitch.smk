rule stitch:
    input:
        batches_of_name,
    output:
        **stitch_outputs(),
    log:
        str(LOGS / "stitch" / "{name}.log"),
    benchmark:
        str(BENCH / "stitch" / "{name}.tsv")
    conda:
        ENV
    resources:
        mem_mb=16000,
    params:
        settings=settings("input", "tiling", "stitch"),
    script:
        "../../scripts/stitch.py"
