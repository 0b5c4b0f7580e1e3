#!/usr/bin/env bash
# The lowest snakemake and SLURM executor plugin that pyproject.toml allows, installed once in a
# throwaway venv: a dry run of the demo with `--profile slurm` from a copy of the repository.
# mgs itself comes from VENV (default .venv), on PATH for the workflow's preflight, and from the
# repository on PYTHONPATH for the workflow's config checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VENV_BIN=$(cd "$VENV/bin" && pwd)
floor() { sed -n "s/^ *\"$1>=\([0-9.]*\)\",*/\1/p" pyproject.toml; }
SNAKEMAKE=$(floor snakemake)
PLUGIN=$(floor snakemake-executor-plugin-slurm)
[ -n "$SNAKEMAKE" ] && [ -n "$PLUGIN" ] || { echo "floor.sh: no floors in pyproject.toml" >&2; exit 2; }
REPO=$(pwd)
WORK=$(mktemp -d /tmp/mgs-floor.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "snakemake==$SNAKEMAKE" "snakemake-executor-plugin-slurm==$PLUGIN"
cp -r workflow config profiles envs "$WORK/"
cp -P slurm "$WORK/"
cd "$WORK"
# common.smk imports mgs's config checks (pure Python): the repository on PYTHONPATH
PATH="$WORK/venv/bin:$VENV_BIN:$PATH" PYTHONPATH="$REPO" "$WORK/venv/bin/snakemake" \
    --profile slurm -n >"$WORK/dry.log" 2>&1 || { tail -n 30 "$WORK/dry.log"; exit 1; }
grep -q "slurm_partition=cpu" "$WORK/dry.log" || { echo "floor.sh: the slurm profile was not used" >&2; exit 1; }
echo "floor versions: snakemake $SNAKEMAKE, snakemake-executor-plugin-slurm $PLUGIN: dry run with --profile slurm passed"
