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
