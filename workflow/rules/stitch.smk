def stitch_outputs():
    outputs = {"image": directory(str(PATHS.image("{name}")))}
    if config["stitch"]["tiff"]:
        outputs["tiff"] = str(PATHS.tiff("{name}"))
    return outputs


rule stitch:
    input:
        tiles_of_name,
    output:
        **stitch_outputs(),
    log:
        str(LOGS / "stitch" / "{name}.log"),
    resources:
        mem_mb=16000,
    conda:
        ENV
    script:
        "../../scripts/stitch.py"
