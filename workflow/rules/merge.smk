# The merged model: blocks cropped to their own cells; anchors.ply, decoder.pt, splats.ply.
# Its blocks are final/ (after finalize) or the last round's when final_iterations is 0.


rule merge:
    input:
        unpack(merge_input),
        config=ancient("results/{scene}/config.yaml"),
    output:
        decoder="results/{scene}/model/decoder.pt",
        anchors="results/{scene}/model/anchors.ply",
        splats="results/{scene}/model/splats.ply",
    log:
        "results/{scene}/logs/merge.log",
    benchmark:
        "results/{scene}/benchmarks/merge.tsv"
    conda:
        "../../envs/mgs.yaml"
    resources:
        mem_mb=mem_mb("merge"),
        runtime=runtime("merge"),
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("final"),
    shell:
        "mgs merge --run {params.run} > {log} 2>&1"
