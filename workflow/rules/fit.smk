# The GPU steps: features, RL and the batched generator fit of one batch of tiles, in
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
        settings=settings(
            "input", "psf", "tiling", "restore", warm_start=config["fit"]["warm_start"]
        ),
    script:
        "../../scripts/fit.py"


# With fit.warm_start: one tile fitted first with restore.iterations; every fit job starts
# its tiles from the weights it writes (GPU, like fit; resources in profiles/*/config.yaml).
rule seed:
    input:
        str(PATHS.prepared()),
        groups_of_tiles([PLAN.seed_tile.id]),
    output:
        str(PATHS.seed()),
    log:
        str(LOGS / "seed.log"),
    benchmark:
        str(BENCH / "seed.tsv")
    conda:
        ENV
    threads: 2
    params:
        settings=settings("input", "psf", "tiling", "restore"),
    script:
        "../../scripts/seed.py"
