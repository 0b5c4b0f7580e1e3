"""What the workflow plans, as plain Python: the run folder's layout, the config values that shape
each stage (its rerun trigger), and what each job asks a cluster for.

`workflow/rules/common.smk` keeps only what needs Snakemake (config validation, checkpoints,
input functions) and calls these; `mgs plan` prints the requests for a config without Snakemake.
"""
