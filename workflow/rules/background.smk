def background_outputs(wildcards=None):
    outputs = {"intensity": str(PATHS.intensity("{unit}"))}
    if config["background"]["enabled"]:
        outputs["background"] = str(PATHS.background("{unit}"))
    return outputs


rule background:
    input:
        str(PATHS.prepared()),
    output:
        **background_outputs(),
    log:
        str(LOGS / "background" / "{unit}.log"),
    resources:
        mem_mb=8000,
    conda:
        ENV
    script:
        "../../scripts/background.py"
