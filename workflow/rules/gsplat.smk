# gsplat's CUDA extension, compiled once into gsplat.extensions_dir on a GPU node before any GPU
# job (their input); a no-op record where no GPU is visible. workflow/README.md, "GPU jobs".


rule gsplat_build:
    output:
        GSPLAT_BUILD,
    log:
        GSPLAT_BUILD_LOG,
    conda:
        "../../envs/mgs.yaml"
    threads: 4
    resources:
        gpu=gpu("gsplat_build"),
        mem_mb=gsplat_build_request("mem_mb"),
        runtime=gsplat_build_request("runtime"),
    params:
        arch=GSPLAT["arch_list"],
    shell:
        "MAX_JOBS={threads} mgs gsplat-build --out {output} > {log} 2>&1"
