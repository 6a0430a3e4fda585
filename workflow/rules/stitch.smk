# One job per part: an input file with all its time points and channels, or
# jobs.images_per_job small images of a folder. Its output is the record of the files
# it wrote (OME-Zarr, TIFF); common.smk drops a record whose files have gone.
rule stitch:
    input:
        batches_of_part,
    output:
        record=str(PATHS.stitched("{part}")),
    log:
        str(LOGS / "stitch" / "{part}.log"),
    benchmark:
        str(BENCH / "stitch" / "{part}.tsv")
    conda:
        ENV
    resources:
        mem_mb=4000,
    params:
        settings=settings("input", "tiling", "stitch"),
    script:
        "../../scripts/stitch.py"
