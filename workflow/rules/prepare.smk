rule prepare:
    input:
        sorted({u.file for u in PLAN.units}),
    output:
        zarr=directory(str(PATHS.input_zarr())),
        summary=str(PATHS.prepared()),
    log:
        str(LOGS / "prepare.log"),
    benchmark:
        str(BENCH / "prepare.tsv")
    conda:
        ENV
    params:
        settings=settings("input", "tiling"),
    script:
        "../../scripts/prepare.py"
