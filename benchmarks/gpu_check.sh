#!/usr/bin/env bash
# The first real run of the CUDA path, in one script, on a machine with a CUDA GPU:
#
#   benchmarks/gpu_check.sh            # from the repository root
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
#
# Steps (each with a time limit; a failing step does not stop the later ones):
#   1. environment: GPU, torch and its CUDA, nvcc, gsplat
#   2. gsplat's CUDA extension built once for this GPU (`mgs gsplat-build`), timed
#   3. the CUDA tests (pytest -m cuda): trainer, densify statistics vs CPU, resume, evaluate, ...
#   4. bench_render's CUDA cases: gsplat vs the torch backend
#   5. the CI-sized workflow (config/ci.yaml) with train.device: cuda, in a copy of the workflow
#   6. seconds per training step measured by that run, beside the cluster requests' model
# then one summary. Logs: $GPU_CHECK_OUT (default $OUT when set, else ./gpu_check_out).
# Needs an environment with this repository's dependencies (make install) and a CUDA torch;
# nothing is downloaded. The build (2) dominates the first run: several minutes.

set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
LOGS=${GPU_CHECK_OUT:-${OUT:-$REPO/gpu_check_out}}
mkdir -p "$LOGS"
LOGS=$(cd "$LOGS" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's mgs, also in the workflow's jobs
export PATH="$(dirname "$PYTHON"):$PATH"               # the jobs call `mgs` and `python`
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mgs-gpu-check.XXXXXX")
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions"
SUMMARY=()

step() {  # step NAME LIMIT_S COMMAND...: run, log, time, remember PASS/FAIL
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS status
    echo "== $name (limit ${limit}s)" | tee -a "$LOGS/summary.txt"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    status=$?
    local verdict=PASS
    [ $status -eq 0 ] || verdict="FAIL (exit $status$([ $status -eq 124 ] && echo ', time limit'))"
    SUMMARY+=("$(printf '%-10s %-28s %5ss' "$verdict" "$name" $((SECONDS - start)))")
    tail -n 15 "$LOGS/$name.log"
}

# 1. environment; the capability of GPU 0 becomes the build's architecture list
step environment 120 "$PYTHON" benchmarks/gpu_check_env.py
ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST=$ARCH
echo "TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR TORCH_CUDA_ARCH_LIST=$ARCH" | tee -a "$LOGS/summary.txt"

# 2. the build (what the workflow's gsplat_build job does), into a fresh folder
step gsplat_build 1200 "$PYTHON" -m mgs.cli gsplat-build --out "$TORCH_EXTENSIONS_DIR/gsplat_build.json"

# 3. every CUDA test, with the reason of each skip
step cuda_tests 900 "$PYTHON" -m pytest -m cuda -rs -v -p no:cacheprovider tests

# 4. rasteriser speed and memory on this GPU
step bench_render 600 "$PYTHON" benchmarks/bench_render.py --cuda-only --repeats 3

# 5. the CI scene through Snakemake on the GPU, reusing the build of step 2
cp -r workflow config profiles envs "$WORK/"
cat >"$WORK/gpu.yaml" <<EOF
gsplat:
  arch_list: "$ARCH"
  extensions_dir: $TORCH_EXTENSIONS_DIR
scenes:
  ci:
    train:
      device: cuda
EOF
step workflow 900 bash -c 'cd "$0" && "$1" -m snakemake --cores 4 --resources gpu=1 \
    --configfile config/ci.yaml gpu.yaml && cat results/ci/eval/metrics.json' "$WORK" "$PYTHON"
# 6. seconds per step on this GPU beside what the cluster requests assume (mgs.plan.resources)
step step_time 120 "$PYTHON" benchmarks/step_time.py "$WORK/results/ci"
cp -r "$WORK/results/ci/logs" "$LOGS/workflow_job_logs" 2>/dev/null
cp "$WORK/results/ci/eval/metrics.json" "$LOGS/workflow_metrics.json" 2>/dev/null

{
    echo
    echo "==================== GPU check summary ===================="
    printf '%s\n' "${SUMMARY[@]}"
    echo "build record:"
    cat "$TORCH_EXTENSIONS_DIR/gsplat_build.json" 2>/dev/null || echo "  (none)"
    echo "CUDA tests:"
    grep -E '(PASSED|FAILED|SKIPPED|ERROR)|^(FAILED|SKIPPED|ERROR) |[0-9]+ (passed|failed)' \
        "$LOGS/cuda_tests.log" | tail -n 30
    echo "bench_render (CUDA):"
    grep -E '@|error' "$LOGS/bench_render.log" || echo "  (no results)"
    echo "step time (calibrates STEP_SECONDS in mgs/plan/resources.py):"
    grep -E 'measured_s_per_step' "$LOGS/step_time.log" || echo "  (none)"
    echo "workflow metrics:"
    "$PYTHON" -c 'import json,sys; m=json.load(open(sys.argv[1])); print(" ", m["device"], m["backend"],
        {k: round(v, 4) for k, v in m["metrics"].items() if k in ("psnr", "ssim", "lpips_vgg")},
        "fps", round(m["fps"], 1))' "$LOGS/workflow_metrics.json" 2>/dev/null || echo "  (none)"
    echo "logs: $LOGS"
} | tee -a "$LOGS/summary.txt"
rm -rf "$WORK"
grep -q '^FAIL' <(printf '%s\n' "${SUMMARY[@]}") && exit 1
exit 0
