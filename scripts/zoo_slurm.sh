#!/usr/bin/env bash
# A model zoo on a Slurm cluster: `liederiv zoo --shard K/N` as a job array of N tasks (each
# measures every N-th model × image unit, on one GPU or CPU node), then one dependent job that
# merges the units into the results — the same files, to the byte, as one process would write.
# A task that is preempted or fails can simply be resubmitted: units already written are skipped.
#
#   scripts/zoo_slurm.sh configs/zoo_example.toml 8            # 8 shards, then the merge
#   SBATCH_ARGS="--partition=gpu --gres=gpu:1 --time=04:00:00" scripts/zoo_slurm.sh my_zoo.toml 32
#
# Environment: LIEDERIV (the binary; default: liederiv on PATH), LOG_DIR (the jobs' logs; default
# logs/), SBATCH_ARGS (extra sbatch options
# for the shard tasks, e.g. partition, GPU, time limit), MERGE_ARGS (for the merge job; it needs no
# GPU), LIEDERIV_DATA_DIR and HF_HOME as for any liederiv run (the nodes read the same data and Hub
# cache; the cache must already hold every Hub model when the nodes are offline: run
# `liederiv zoo --config ZOO --shard 1/1000000` once on a login node to fetch them).
# Every task writes to the zoo's output folder (`zoo.out`, default runs/<name>): it must be on a
# file system all nodes share.
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: $0 ZOO_CONFIG N_SHARDS" >&2
    exit 2
fi
ZOO=$1
N=$2
BIN=${LIEDERIV:-liederiv}
[[ -f $ZOO ]] || { echo "$0: no zoo config at $ZOO" >&2; exit 2; }
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "$0: N_SHARDS must be a positive integer, got $N" >&2; exit 2; }
LOGS=${LOG_DIR:-logs}
mkdir -p "$LOGS"
# Task K of the array measures shard K/N (Slurm numbers the tasks 1..N here).
# shellcheck disable=SC2086
ARRAY=$(sbatch --parsable --job-name=zoo-shards --array=1-"$N" --output="$LOGS/zoo-%A_%a.out" \
    ${SBATCH_ARGS:-} \
    --wrap "$BIN zoo --config $ZOO --set output.progress=false --shard \${SLURM_ARRAY_TASK_ID}/$N")
# shellcheck disable=SC2086
MERGE=$(sbatch --parsable --job-name=zoo-merge --dependency=afterok:"$ARRAY" --output="$LOGS/zoo-merge-%j.out" \
    ${MERGE_ARGS:-} \
    --wrap "$BIN zoo --config $ZOO --set output.progress=false --merge")
echo "submitted shards as job array $ARRAY (1-$N) and the merge as job $MERGE (runs after all shards succeed)"
