#!/usr/bin/env bash
# Issue 18 on a lent GPU machine, in one call: Table 1 at GPU scale (`BUDGET=gpu scripts/table1.sh`,
# 6 rows × 3 seeds at once), with the binaries scripts/build_cuda.sh packed and the data in
# .gpu-data/ (copy ../shared/data there):
#
#   OUT=/somewhere scripts/gpu_table1.sh       # the device tool sets $OUT
#
# Bounded in time so that what ran comes back: the table gets TABLE_SECONDS (default 500; its
# steps are fitted to FIT_SECONDS, default 420, inside that), then whatever each run wrote
# (config, metrics, summary, log; no checkpoints) is copied to $OUT/runs even for runs the limit
# stopped. Beside it, the GPU-vs-CPU tests (tests/cuda.rs) run once with a 150 s limit, and
# nvidia-smi samples utilisation and memory every 5 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-table1}
RUNS=${RUNS:-/tmp/liederiv-table1-gpu}
mkdir -p "$OUT/runs" "$OUT/logs"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh
t0=$SECONDS

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; ldd "$BIN/liederiv" | grep -E 'cuda|cublas|curand|nvrtc'; } > "$OUT/machine.txt" 2>&1
nvidia-smi dmon -s um -d 5 > "$OUT/dmon.txt" 2>&1 &
dmon=$!
[[ ${CUDA_TESTS:-1} == 0 ]] || RAYON_NUM_THREADS=2 timeout 150 "$BIN/cuda_tests" --test-threads=1 > "$OUT/cuda_tests.log" 2>&1 &
tests=$!

# Candle's CPU threads only prepare data here: one each, 18 runs on the machine's cores.
RAYON_NUM_THREADS=1 BUDGET=gpu BIN=$BIN/liederiv RUNS=$RUNS REPORT=$OUT/report FIT_SECONDS=${FIT_SECONDS:-420} \
    timeout "${TABLE_SECONDS:-500}" scripts/table1.sh > "$OUT/table1.log" 2>&1
echo "table1.sh: exit $? after $((SECONDS - t0)) s" >> "$OUT/table1.log"
# The limit stops the script, not the runs it started.
pkill -f "$BIN/liederiv train" && echo "stopped the runs still training" >> "$OUT/table1.log"

for d in "$RUNS"/*/ "$RUNS"/fit/*/; do
    [[ -f $d/config.toml ]] || continue
    dst=$OUT/runs/$(basename "$d")
    [[ $d == */fit/* ]] && dst=$OUT/runs/fit/$(basename "$d")
    mkdir -p "$dst"
    cp "$d"/{config.toml,metrics.jsonl,summary.json} "$dst/" 2>/dev/null
    [[ -f $d/pretrain/metrics.jsonl ]] && mkdir -p "$dst/pretrain" && cp "$d/pretrain/metrics.jsonl" "$dst/pretrain/"
done
cp "$RUNS"/*.log "$OUT/logs/" 2>/dev/null
cp "$RUNS"/fit/*.{log,sps} "$OUT/logs/" 2>/dev/null
wait "$tests"
echo "cuda_tests: exit $?" >> "$OUT/cuda_tests.log"
kill "$dmon" 2>/dev/null
echo "gpu_table1: $((SECONDS - t0)) s in all"
tail -n 3 "$OUT/table1.log" "$OUT/cuda_tests.log"
# What comes back from a lent machine is limited in file count: one archive.
tar czf /tmp/gpu_table1.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/gpu_table1.tgz "$OUT/"
