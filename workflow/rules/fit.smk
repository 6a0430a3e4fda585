# The GPU step: features, RL and the batched generator fit of one batch of tiles, in
# passes of ≤ fit.batch_size same-shape tiles (a folder's small images: jobs.images_per_job). GPU, runtime, memory, retries and how many batches share one
# cluster job (group-components for group "restore") are set in profiles/*/config.yaml.
rule fit:
    input:
        str(PATHS.prepared()),
        groups_of_batch,
    output:
        tiles=str(PATHS.tiles("{batch}")),
        metrics=str(PATHS.metrics("{batch}")),
    log:
        str(LOGS / "fit" / "{batch}.log"),
    benchmark:
        str(BENCH / "fit" / "{batch}.tsv")
    group:
        "restore"
    conda:
        ENV
    threads: 2
    params:
        settings=settings("input", "psf", "tiling", "restore"),
    script:
        "../../scripts/fit.py"
