# Test views of the merged model: PSNR, SSIM, LPIPS (raw and colour-corrected), renders.


rule evaluate:
    input:
        config=ancient(run_file("config")),
        decoder=run_file("model_decoder"),  # the merged model: anchors and decoders
        scene=run_file("scene"),
        gsplat=gsplat_build_input,
    output:
        metrics=report(
            run_file("metrics"),
            caption="../report/metrics.rst",
            category="Metrics",
            labels={"scene": "{scene}", "file": "metrics.json"},
        ),
        per_view=run_file("per_view"),
    log:
        run_log("evaluate"),
    benchmark:
        "results/{scene}/benchmarks/evaluate.tsv"
    conda:
        "../../envs/mgs.yaml"
    resources:
        gpu=gpu("evaluate"),
        mem_mb=mem_mb("evaluate"),
        runtime=runtime("evaluate"),
        constraint=constraint("evaluate"),
        gpu_model=gpu_model,
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("final"),
    shell:
        "mgs evaluate --run {params.run} > {log} 2>&1"
