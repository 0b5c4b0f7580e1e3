#!/usr/bin/env bash
# Workflow lint: `snakemake --lint` (rules, logs, conda envs) and snakefmt formatting.
# Uses VENV (default .venv) for snakemake and snakefmt (pip install snakefmt).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ -x "$VENV/bin/snakemake" ]; then
    export PATH="$(cd "$VENV/bin" && pwd):$PATH"
fi
snakemake --lint --cores 1
snakefmt --check --diff workflow
echo "workflow lint and format: clean"
