# Momentum-GS rounds: init (round 0) -> for r in 1..R: train_block per block -> sync -> after R:
# finalize_block per block (none when final_iterations is 0). Every job reads only the previous
# round's files. Cluster requests (memory, time, GPU): mgs/plan/resources.py.


rule init:
    input:
        config=ancient(run_file("config")),
        scene=run_file("scene"),
        partition=run_file("partition"),
    output:
        directory(run_file("init")),
    log:
        run_log("init"),
    benchmark:
        "results/{scene}/benchmarks/init.tsv"
    conda:
        "../../envs/mgs.yaml"
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("blocks"),
    shell:
        "mgs init --run {params.run} > {log} 2>&1"


rule train_block:
    input:
        unpack(train_block_input),
        config=ancient(run_file("config")),
    output:
        block=run_file("block"),
        # student, teacher and metrics only: what sync reads
        decoder=run_file("decoder"),
    log:
        run_log("train_block"),
    benchmark:
        "results/{scene}/benchmarks/train_block/round_{r}/block_{b}.tsv"
    group:
        round_group
    conda:
        "../../envs/mgs.yaml"
    threads: 1
    resources:
        gpu=gpu("train_block"),
        mem_mb=mem_mb("train_block"),
        runtime=runtime("train_block"),
        constraint=constraint("train_block"),
        gpu_model=gpu_model,
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("blocks"),
    shell:
        "mgs train-block --run {params.run} --round {wildcards.r} --block {wildcards.b} "
        "> {log} 2>&1"


# A local rule: it reads kilobytes (the blocks' decoder summaries), so it runs on the submit
# host in seconds and a round waits in the queue once, for its block jobs only.
rule sync:
    input:
        unpack(sync_input),
        config=ancient(run_file("config")),
    output:
        shared=run_file("shared"),
        table=run_file("sync_table"),
    log:
        run_log("sync"),
    benchmark:
        "results/{scene}/benchmarks/sync/round_{r}.tsv"
    wildcard_constraints:
        scene=grouped_scenes_regex(False),
    conda:
        "../../envs/mgs.yaml"
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("blocks"),
    shell:
        "mgs sync --run {params.run} --round {wildcards.r} > {log} 2>&1"


# The same sync inside a group job of several rounds (cluster.rounds_per_job > 1): not a local
# rule, or the whole group would run on the submit host.
use rule sync as sync_in_group with:
    wildcard_constraints:
        scene=grouped_scenes_regex(True),
    group:
        round_group
    resources:
        runtime=5,
        mem_mb=4000,


rule finalize_block:
    input:
        unpack(finalize_input),
        config=ancient(run_file("config")),
    output:
        run_file("final"),
    log:
        run_log("finalize_block"),
    benchmark:
        "results/{scene}/benchmarks/finalize_block/block_{b}.tsv"
    conda:
        "../../envs/mgs.yaml"
    threads: 1
    resources:
        gpu=gpu("finalize_block"),
        mem_mb=mem_mb("finalize_block"),
        runtime=runtime("finalize_block"),
        constraint=constraint("finalize_block"),
        gpu_model=gpu_model,
    params:
        run=subpath(input.config, parent=True),
        settings=stage_trigger("final"),
    shell:
        "mgs finalize-block --run {params.run} --block {wildcards.b} > {log} 2>&1"
