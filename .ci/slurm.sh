#!/usr/bin/env bash
# Real SLURM in CI: a one-node cluster with two fake GPUs, the CI-sized scene through
#   snakemake --profile slurm --profile .ci/slurm-profile --configfile config/ci.yaml .ci/slurm-cpu.yaml
# (`--profile slurm` as users type it, from the repository root). Checks that the block jobs went
# through sbatch with --gpus=1, that 4 blocks ran on the 2 GPU slots, that sync ran on the submit
# host (no sbatch), that a block job cancelled with scancel is retried and the workflow completes,
# and that a job killed by SLURM for exceeding its memory is resubmitted with more and succeeds.
# Needs root and apt (Debian/Ubuntu). Uses VENV (default .venv) for snakemake and mgs.
# Everything else lives in a temporary folder; the daemons are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VENV:-.venv}
if [ -x "$VENV/bin/snakemake" ]; then
    export PATH="$(cd "$VENV/bin" && pwd):$PATH"
fi
command -v snakemake >/dev/null && command -v mgs >/dev/null ||
    { echo "slurm.sh: snakemake and mgs not found (set VENV)" >&2; exit 2; }
start=$(date +%s)

# ------------------------------------------------------------------ packages
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# ------------------------------------------------------------------ cluster
WORK=$(mktemp -d /tmp/mgs-slurm.XXXXXX)
RUN=$(mktemp -d /tmp/mgs-slurm-run.XXXXXX) # the workflow copy the jobs run in
HOST=$(hostname -s)
# The configuration must be at the default place: the plugin's job steps call srun with every
# SLURM_* variable removed (SLURM_CONF included). An existing one is put back on exit.
CONF_DIR=/etc/slurm
export SLURM_CONF=$CONF_DIR/slurm.conf
mkdir -p "$CONF_DIR" "$WORK/saved" "$WORK/state" "$WORK/spool" "$WORK/munge"
for name in slurm.conf gres.conf; do
    if [ -e "$CONF_DIR/$name" ]; then cp -p "$CONF_DIR/$name" "$WORK/saved/$name"; fi
done

stop() {
    local rc=$?
    set +e
    if [ -n "${WATCH_PID:-}" ]; then kill "$WATCH_PID" 2>/dev/null; fi
    scancel --quiet --user="$(id -un)" 2>/dev/null
    for pidfile in "$WORK/slurmd.pid" "$WORK/slurmctld.pid" "$WORK/munge/munged.pid"; do
        if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null; fi
    done
    sleep 1
    for name in slurm.conf gres.conf; do
        rm -f "$CONF_DIR/$name"
        if [ -e "$WORK/saved/$name" ]; then cp -p "$WORK/saved/$name" "$CONF_DIR/$name"; fi
    done
    if [ "$rc" -ne 0 ]; then
        echo "---- slurmctld.log (tail)"
        tail -n 30 "$WORK/slurmctld.log" 2>/dev/null
        echo "---- snakemake log (tail)"
        grep -v '^sbatch call\|^General args' "$WORK/snakemake.log" 2>/dev/null | tail -n 40
        for log in $(ls -t "$RUN"/.snakemake/slurm_logs/*/*/*.log 2>/dev/null | head -n 2); do
            echo "---- $log (tail)"
            tail -n 20 "$log"
        done
    fi
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK and $RUN"; else rm -rf "$WORK" "$RUN"; fi
    exit "$rc"
}
trap stop EXIT

# munge with its own key and socket (no system service touched)
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$WORK/munge"
chmod 400 "$WORK/munge/munge.key"
munged --force --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/munge.socket" \
    --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" \
    --seed-file="$WORK/munge/munged.seed"

mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
cat >"$SLURM_CONF" <<EOF
ClusterName=mgsci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$WORK/munge/munge.socket
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# no cgroups here: memory is enforced by polling each job's RSS every second (OverMemoryKill)
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=1
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
# memory a consumable: only then does a job step carry its --mem as a limit to enforce
SelectTypeParameters=CR_Core_Memory
MinJobAge=600
ReturnToService=2
MpiDefault=none
GresTypes=gpu
# the profile asks up to 64 GB: accept the node as declared (config_overrides), whatever it has
SlurmdParameters=config_overrides
NodeName=$HOST CPUs=2 RealMemory=$((mem_mb > 64000 ? mem_mb : 64000)) Gres=gpu:2 State=UNKNOWN
# the partition names of profiles/slurm, both on this node
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
cat >"$CONF_DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=$HOST Name=gpu File=/dev/null
NodeName=$HOST Name=gpu File=/dev/zero
EOF
slurmctld
slurmd
for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -n 1)
    [ "$state" = idle ] && break
    sleep 1
done
[ "$state" = idle ] || { echo "slurm.sh: node state '$state', not idle" >&2; exit 1; }
echo "SLURM up: node $HOST, 2 CPUs, gres $(sinfo -h -o %G | head -n 1), partitions $(sinfo -h -o %P | tr '\n' ' ')"

# ------------------------------------------------------------------ workflow
cp -r workflow config profiles envs .ci "$RUN/"
cp -P slurm "$RUN/"
cd "$RUN"

# Cancel one block job once it has written an in-job checkpoint: the workflow must retry it.
watch_and_cancel() {
    set +e +o pipefail
    for _ in $(seq 600); do
        squeue -h -t RUNNING -o '%i %k' 2>/dev/null | grep rule_train_block_ | head -n 1 |
            while read -r id comment; do
                round=$(echo "$comment" | awk -F_ '{print $(NF-1)}')
                block=$(echo "$comment" | awk -F_ '{print $NF}')
                for _ in $(seq 120); do
                    if [ -e "results/ci/rounds/$round/block_$block.partial.pt" ]; then
                        scancel "$id" && echo "$id round $round block $block" >"$WORK/cancelled"
                        exit 0
                    fi
                    sleep 0.5
                done
            done
        [ -s "$WORK/cancelled" ] && return 0
        sleep 1
    done
}
watch_and_cancel &
WATCH_PID=$!

wf_start=$(date +%s)
snakemake --profile slurm --profile .ci/slurm-profile \
    --configfile config/ci.yaml .ci/slurm-cpu.yaml --verbose >"$WORK/snakemake.log" 2>&1
wf_wall=$(($(date +%s) - wf_start))
wait "$WATCH_PID" || true
WATCH_PID=

# ------------------------------------------------------------------ checks
fail() { echo "slurm.sh: FAIL: $*" >&2; exit 1; }
test -s results/ci/eval/metrics.json || fail "no results/ci/eval/metrics.json"
test -s results/report/report.html || fail "no report"

sbatch_lines=$(grep -E '^sbatch call: sbatch ' "$WORK/snakemake.log" || true)
n_sbatch=$(printf '%s\n' "$sbatch_lines" | grep -c . || true)
gpu_lines=$(printf '%s\n' "$sbatch_lines" | grep -- '--gpus=1' || true)
n_gpu=$(printf '%s\n' "$gpu_lines" | grep -c . || true)
n_block=$(printf '%s\n' "$gpu_lines" | grep -c 'rule_train_block_' || true)
n_final=$(printf '%s\n' "$gpu_lines" | grep -c 'rule_finalize_block_' || true)
n_sync=$(printf '%s\n' "$sbatch_lines" | grep -c 'rule_sync_' || true)
# submit-to-start latency of each job: SubmitTime to StartTime in slurmctld's records
submitted=$(grep -c '_slurm_rpc_submit_batch_job' "$WORK/slurmctld.log" || true)

# Completed jobs stay in slurmctld for MinJobAge (600 s): when each GPU job ran.
scontrol -o show job >"$WORK/jobs.txt"
gpu_jobs=$(grep -E 'Comment=rule_(train|finalize)_block_' "$WORK/jobs.txt" || true)
# most block jobs running at the same time, from their start and end times
overlap=$(printf '%s\n' "$gpu_jobs" | grep -o 'StartTime=[^ ]* EndTime=[^ ]*' |
    sed 's/StartTime=//; s/EndTime=//' |
    while read -r s e; do
        echo "$(date -d "$s" +%s) 1"
        echo "$(date -d "$e" +%s) -1"
    done | sort -k1,1n -k2,2n | awk '{c += $2; if (c > m) m = c} END {print m + 0}')
# the GPU SLURM gave each block job (the job step logs its environment with --verbose)
gpu_slots=$(grep -ho "'CUDA_VISIBLE_DEVICES': '[0-9,]*'" \
    .snakemake/slurm_logs/rule_train_block/*/*.log \
    .snakemake/slurm_logs/rule_finalize_block/*/*.log 2>/dev/null |
    sed "s/'CUDA_VISIBLE_DEVICES': //; s/'//g" | sort | uniq -c |
    awk '{printf "GPU %s: %d jobs; ", $2, $1}')
n_slots=$(printf '%s' "$gpu_slots" | grep -o 'GPU [0-9]*:' | sort -u | grep -c . || true)

echo "==== SLURM CI"
echo "sbatch submissions: $n_sbatch (snakemake log); accepted by slurmctld: $submitted"
echo "GPU submissions (--gpus=1): $n_gpu (train_block $n_block, finalize_block $n_final)"
echo "GPU sbatch lines (options before --wrap):"
printf '%s\n' "$gpu_lines" | sed 's/^sbatch call: //; s/ --wrap=.*//; s/--job-name [^ ]* //;
    s/--output [^ ]* //; s/ -D [^ ]*//; s/  */ /g' | sed 's/^/  /'
echo "block jobs per GPU: ${gpu_slots:-none}most block jobs at once: $overlap"
if [ -s "$WORK/cancelled" ]; then
    echo "scancel: job $(cat "$WORK/cancelled") cancelled; retried and completed"
fi
latency=$({ grep -o 'SubmitTime=[^ ]* EligibleTime=[^ ]* AccrueTime=[^ ]* StartTime=[^ ]*' \
    "$WORK/jobs.txt" || true; } | sed 's/SubmitTime=//; s/ EligibleTime=[^ ]* AccrueTime=[^ ]* StartTime=/ /' |
    while read -r submit begin; do
        echo $(($(date -d "$begin" +%s) - $(date -d "$submit" +%s)))
    done | sort -n | awk '{a[NR] = $1; s += $1} END {if (NR) printf "mean %.1f s, median %d s, max %d s over %d jobs", s / NR, a[int((NR + 1) / 2)], a[NR], NR}')
echo "submit-to-start latency: ${latency:-none}"
echo "sync jobs submitted: $n_sync (sync is a local rule)"
echo "workflow wall time: ${wf_wall} s"

blocks=$(python3 -c 'import json; print(len(json.load(open("results/ci/partition/partition.json"))["blocks"]))')
rounds=2
[ "$blocks" -eq 4 ] || fail "expected 4 blocks, got $blocks"
[ "$n_block" -ge $((blocks * rounds)) ] || fail "only $n_block train_block jobs with --gpus=1"
[ "$n_final" -ge "$blocks" ] || fail "only $n_final finalize_block jobs with --gpus=1"
[ "$overlap" -eq 2 ] || fail "expected 2 GPU jobs at once on 2 GPUs, saw $overlap"
[ "$n_slots" -eq 2 ] || fail "expected block jobs on both GPUs, got: $gpu_slots"
[ -s "$WORK/cancelled" ] || fail "no block job was cancelled"
[ "$n_sync" -eq 0 ] || fail "sync went through sbatch $n_sync times; it is a local rule"
[ "$n_block" -eq $((blocks * rounds + 1)) ] ||
    fail "expected $((blocks * rounds)) block submissions + 1 retry, got $n_block"
grep -q 'resuming block_' results/ci/logs/train_block/round_*/block_*.log ||
    echo "note: the retried block did not find an in-job checkpoint to resume from"

# ------------------------------------------------------------------ memory kill and retry
# One finalize job asks for less memory than it uses (.ci/slurm-oom-profile: mem_mb scaled by
# attempt, as in profiles/slurm): SLURM kills it, Snakemake resubmits it with twice the memory.
oom_start=$(date +%s)
snakemake --profile slurm --profile .ci/slurm-profile --profile .ci/slurm-oom-profile \
    --configfile config/ci.yaml .ci/slurm-cpu.yaml -R results/ci/final/block_0.pt \
    --until finalize_block --verbose >"$WORK/oom.log" 2>&1 ||
    fail "the memory-killed job was not retried to success (see $WORK/oom.log)"
oom_mem=$(grep -E '^sbatch call: sbatch .*rule_finalize_block_' "$WORK/oom.log" |
    grep -o -- '--mem [0-9]*' | awk '{print $2}' | paste -sd' ')
oom_killed=$(grep -l -i 'exceeded .*memory\|oom\|out.of.memory' \
    .snakemake/slurm_logs/rule_finalize_block/*/*.log 2>/dev/null | head -n 1)
echo "memory kill: finalize_block submitted with --mem $oom_mem MB in $(($(date +%s) - oom_start)) s"
[ "$(echo "$oom_mem" | wc -w)" -ge 2 ] || fail "finalize_block was not resubmitted (mem: $oom_mem)"
[ -n "$oom_killed" ] || fail "no finalize_block log says it ran out of memory"
grep -i -m 1 'exceeded .*memory\|oom\|out.of.memory' "$oom_killed" | sed 's/^/  /'

# ------------------------------------------------------------------ rounds as one group job
# cluster.rounds_per_job 2: both rounds of every block, and their syncs, in one sbatch job that
# gets the node's 2 GPUs (--resources gpu=2) and runs the block jobs inside it.
group_start=$(date +%s)
snakemake --profile slurm --profile .ci/slurm-profile --configfile config/ci.yaml \
    .ci/slurm-cpu.yaml .ci/slurm-grouped.yaml --resources gpu=2 --cores 2 \
    -R results/ci/rounds/1/block_0.pt --config allow_full_rerun=true --until sync_in_group \
    --verbose >"$WORK/group.log" 2>&1 ||
    fail "the round-set group job failed (see $WORK/group.log)"
group_lines=$(grep -E '^sbatch call: sbatch ' "$WORK/group.log" || true)
n_group=$(printf '%s\n' "$group_lines" | grep -c -- '--gpus=2' || true)
n_single=$(printf '%s\n' "$group_lines" | grep -c 'rule_train_block_\|rule_sync' || true)
echo "round set as one job: $n_group sbatch with --gpus=2, $n_single block or sync submissions," \
    "$(($(date +%s) - group_start)) s"
printf '%s\n' "$group_lines" | sed 's/^sbatch call: //; s/ --wrap=.*//; s/--output [^ ]* //;
    s/ -D [^ ]*//; s/  */ /g' | sed 's/^/  /'
[ "$n_group" -eq 1 ] || fail "expected one group job with 2 GPUs, got $n_group"
[ "$n_single" -eq 0 ] || fail "block or sync jobs were submitted on their own: $n_single"
test -s results/ci/rounds/2/shared.pt || fail "the group job wrote no round 2 sync"
echo "SLURM CI passed in $(($(date +%s) - start)) s"
