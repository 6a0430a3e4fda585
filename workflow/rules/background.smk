rule background:
    input:
        str(PATHS.prepared()),
    output:
        **background_outputs(),
    log:
        str(LOGS / "background" / "{group}.log"),
    benchmark:
        str(BENCH / "background" / "{group}.tsv")
    conda:
        ENV
    # The feature range's convolutions use them (2 threads: 1.44x faster job, bench/README.md)
    threads: 4
    resources:
        mem_mb=8000,
    params:
        settings=settings(
            "background",
            feature_weights=config["restore"]["feature_weights"],
            generator_input=config["restore"]["generator_input"],
            method=config["restore"]["method"],
        ),
    script:
        "../../scripts/background.py"
