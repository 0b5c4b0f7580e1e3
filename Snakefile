# mgs — Momentum-GS trained block by block. Usage: workflow/README.md.
from snakemake.utils import min_version

min_version("9.19.0")  # the floor .ci/floor.sh tests


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/gsplat.smk"
include: "workflow/rules/scene.smk"
include: "workflow/rules/partition.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs,
