# Blocks: a checkpoint, since cells with too few cameras are merged into a neighbour (the block
# set is known only once partition.json exists).


rule coarse:
    input:
        config=ancient(run_file("config")),
        scene=run_file("scene"),
        gsplat=gsplat_build_input,
    output:
        run_file("coarse"),
    log:
        run_log("coarse"),
    benchmark:
        "results/{scene}/benchmarks/coarse.tsv"
    conda:
        "../../envs/mgs.yaml"
    resources:
        gpu=gpu("coarse"),
        mem_mb=mem_mb("coarse"),
        runtime=runtime("coarse"),
        constraint=constraint("coarse"),
        gpu_model=gpu_model,
    params:
        scene=subpath(input.scene, parent=True),
        out=subpath(output[0], parent=True),
        work=coarse_work,
        steps=coarse_steps,
        settings=stage_trigger("coarse"),
    shell:
        "mgs train --scene {params.scene} --out {params.out} --work {params.work} "
        "--config {input.config} --iterations {params.steps} > {log} 2>&1"


checkpoint partition:
    input:
        unpack(partition_input),
    output:
        json=run_file("partition"),
        tsv=run_file("partition_table"),
        png=report(
            run_file("partition_plot"),
            caption="../report/partition.rst",
            category="Partition",
            labels={"scene": "{scene}"},
        ),
    log:
        run_log("partition"),
    benchmark:
        "results/{scene}/benchmarks/partition.tsv"
    wildcard_constraints:
        scene=ssim_scenes_regex(False),
    conda:
        "../../envs/mgs.yaml"
    params:
        scene=subpath(input.scene, parent=True),
        out=subpath(output.json, parent=True),
        settings=stage_trigger("partition"),
    shell:
        "mgs partition --scene {params.scene} --out {params.out} --config {input.config} "
        "> {log} 2>&1"


# assignment: ssim renders the coarse model once per camera and block: a GPU job, on the GPU
# partition of a cluster profile (a checkpoint of its own, so a profile can place it there).
checkpoint partition_ssim:
    input:
        unpack(partition_input),
    output:
        json=run_file("partition"),
        tsv=run_file("partition_table"),
        png=report(
            run_file("partition_plot"),
            caption="../report/partition.rst",
            category="Partition",
            labels={"scene": "{scene}"},
        ),
    log:
        run_log("partition"),
    benchmark:
        "results/{scene}/benchmarks/partition.tsv"
    wildcard_constraints:
        scene=ssim_scenes_regex(True),
    conda:
        "../../envs/mgs.yaml"
    resources:
        gpu=gpu("partition_ssim"),
        mem_mb=mem_mb("partition_ssim"),
        runtime=runtime("partition_ssim"),
        constraint=constraint("partition_ssim"),
        gpu_model=gpu_model,
    params:
        scene=subpath(input.scene, parent=True),
        out=subpath(output.json, parent=True),
        settings=stage_trigger("partition"),
    shell:
        "mgs partition --scene {params.scene} --out {params.out} --config {input.config} "
        "> {log} 2>&1"
