# The merged model: blocks cropped to their own cells; anchors.ply, decoder.pt, splats.ply (baked,
# then refined on the training views as the `export:` section says: a GPU job), and its
# compressed export.
# Its blocks are final/ (after finalize) or the last round's when final_iterations is 0.


rule merge:
    input:
        unpack(merge_input),
        config=ancient(run_file("config")),
    output:
        decoder=run_file("model_decoder"),
        anchors=run_file("model_anchors"),
        splats=run_file("splats"),
    log:
        run_log("merge"),
    benchmark:
        "results/{scene}/benchmarks/merge.tsv"
    conda:
        "../../envs/mgs.yaml"
    resources:
        gpu=gpu("merge"),
        mem_mb=mem_mb("merge"),
        runtime=runtime("merge"),
        constraint=constraint("merge"),
        gpu_model=gpu_model,
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("merge"),
    shell:
        "mgs merge --run {params.run} > {log} 2>&1"


# The merged model as a .splat file for web viewers (32 bytes per Gaussian), with its size and the
# PSNR of the test views rendered from it beside the PLY's (model/export.csv, in the report).
rule export:
    input:
        config=ancient(run_file("config")),
        splats=run_file("splats"),
        decoder=run_file("model_decoder"),  # the merged model, measured beside its exports
        scene=run_file("scene"),
        gsplat=gsplat_build_input,
    output:
        splat=run_file("splat"),
        table=run_file("export_table"),
    log:
        run_log("export"),
    benchmark:
        "results/{scene}/benchmarks/export.tsv"
    conda:
        "../../envs/mgs.yaml"
    resources:
        gpu=gpu("export"),
        mem_mb=mem_mb("export"),
        runtime=runtime("export"),
        constraint=constraint("export"),
        gpu_model=gpu_model,
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("final"),
    shell:
        "mgs export {params.run} --format splat > {log} 2>&1"
