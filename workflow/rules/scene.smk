# Scene folders (images, COLMAP model, scene.json) and the run's flat config.
# Three rules write scene.json; each is limited to the scenes of its sources.


# A checkpoint, so that once it ran the DAG is re-evaluated: config.yaml is an ancient() input
# everywhere and each job's params carry the digest of the keys it depends on, so a config edit
# reruns exactly the jobs whose keys changed (and config.yaml is rewritten only when its content
# changes).
checkpoint configure:
    output:
        update(run_file("config")),
    log:
        run_log("configure"),
    benchmark:
        "results/{scene}/benchmarks/configure.tsv"
    conda:
        "../../envs/mgs.yaml"
    params:
        settings=configure_settings,
    shell:
        "mgs configure --settings {params.settings:q} --out {output} > {log} 2>&1"


rule scene_synthetic:
    input:
        config=ancient(run_file("config")),
    output:
        run_file("scene"),
    log:
        run_log("scene"),
    benchmark:
        "results/{scene}/benchmarks/scene.tsv"
    wildcard_constraints:
        scene=scene_names_regex("synthetic"),
    conda:
        "../../envs/mgs.yaml"
    params:
        out=subpath(output[0], parent=True),
        settings=stage_trigger("scene"),
    shell:
        "mgs synth {params.out} --config {input.config} > {log} 2>&1"


rule scene_images:
    input:
        config=ancient(run_file("config")),
        images=ingest_source,
    output:
        run_file("scene"),
    log:
        run_log("scene"),
    benchmark:
        "results/{scene}/benchmarks/scene.tsv"
    wildcard_constraints:
        scene=scene_names_regex("images"),
    conda:
        "../../envs/mgs.yaml"
    threads: 2
    params:
        out=subpath(output[0], parent=True),
        settings=stage_trigger("scene"),
        source=source_manifest,
    shell:
        "mgs sfm {input.images:q} {params.out} --config {input.config} > {log} 2>&1"


rule scene_ingest:
    input:
        config=ancient(run_file("config")),
        source=ingest_source,
    output:
        run_file("scene"),
    log:
        run_log("scene"),
    benchmark:
        "results/{scene}/benchmarks/scene.tsv"
    wildcard_constraints:
        scene=scene_names_regex(*INGEST_SOURCES),
    conda:
        "../../envs/mgs.yaml"
    threads: 2
    params:
        out=subpath(output[0], parent=True),
        dataset=ingest_dataset,
        factor=ingest_factor,
        up=ingest_up,
        settings=stage_trigger("scene"),
        source=source_manifest,
    shell:
        "mgs ingest {params.dataset} {input.source:q} {params.out} "
        "--factor {params.factor} {params.up} > {log} 2>&1"
