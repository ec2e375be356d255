#!/usr/bin/env bash
# Validation sweeps behind the Table 1 recipes (issue 18): every run of
# experiments/table1/sweep/runs.txt trains on the 10k train split (data.train_on_val = false)
# and is evaluated on the 2k validation split (accuracy on all of it, rotation LEE on its first
# 128 images), so recipes are chosen without the test split. Finished runs are skipped, an
# interrupted one resumes from its checkpoint; after each run the summary table
# experiments/table1/sweep/RESULTS.md is rewritten from every run's metrics (best and final
# validation error, the step of the best, wall time). A finished run's config, metrics and summary
# are copied to experiments/table1/sweep/runs/<run>/, so the table outlives the run folders.
#
#   LIEDERIV_DATA_DIR=/path/to/data RAYON_NUM_THREADS=1 scripts/table1_sweep.sh
#   ONLY="cnn_aug_e30" scripts/table1_sweep.sh        # some runs only
#   TRAIN=0 scripts/table1_sweep.sh                   # no training: copy finished runs, rewrite the table
#
# A line's first override may be `pretrain_from=<earlier run>`: that run's finished MAE pretraining
# is copied in instead of being recomputed (it must be the same stage: same model, [pretrain] and
# seed; pretraining at one thread is deterministic, so the copy is what the run would compute).
#
# Environment: RUNS (run folders; default /var/tmp/liederiv-sweep, outside the work tree so a
# session's end does not lose them), BIN (a prebuilt liederiv; default: cargo build --release),
# ONLY (names to run), LIST (default experiments/table1/sweep/runs.txt).
set -euo pipefail
set -f # overrides such as model.cnn.widths=[32,64,128] are words, not globs
cd "$(dirname "$0")/.."
EXP=experiments/table1
LIST=${LIST:-$EXP/sweep/runs.txt}
RUNS=${RUNS:-/var/tmp/liederiv-sweep}
OUT=$EXP/sweep/RESULTS.md
KEEP=$EXP/sweep/runs # each finished run's config, metrics and summary, kept with the table
if [[ -z ${BIN:-} ]]; then
    cargo build --release --bin liederiv
    BIN=${CARGO_TARGET_DIR:-target}/release/liederiv
fi
mkdir -p "$RUNS"
VAL=(--set data.train_on_val=false --set 'eval.splits=["val"]' --set eval.limit=0
    --set 'lee.splits=["train", "val", "ood_fashion"]' --set 'lee.transforms=["rotate"]'
    --set lee.limit=128 --set "output.dir=\"$RUNS\"" --set output.plots=true)

summarise() {
    python3 - "$RUNS" "$LIST" "$OUT" "$KEEP" > "$OUT.tmp" <<'PY'
import json, os, sys
runs, listing, out, keep = sys.argv[1:5]
# A run's row comes from its copy under sweep/runs/ (finished) or its folder under RUNS (running);
# a run with neither (its folder went with an earlier machine) keeps the row it had.
old = {}
if os.path.exists(out):
    for l in open(out):
        if l.startswith("| ") and not l.startswith("| run "):
            old[l.split("|")[1].strip().split()[0]] = l.rstrip("\n")
print("# Table 1 validation sweeps\n")
print("Written by `scripts/table1_sweep.sh` from the runs of `sweep/runs.txt`: trained on the 10k")
print("train split, measured on the 2k validation split (never the test split). Rotation LEE on")
print("the first 128 validation images at the last evaluation. Wall time: one thread, including")
print("the MAE pretraining of a run that computed it (`pretrain_from=` runs copied that stage).\n")
print("| run | row | overrides | epochs | val error, final | val error, best (step) | val LEE rotate | wall time |")
print("| :-- | :-- | :-- | --: | --: | --: | --: | --: |")
for line in open(listing):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    name, row, *sets = line.split()
    run = os.path.join(keep, name)
    if not os.path.exists(os.path.join(run, "summary.json")):
        run = os.path.join(runs, name)
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        if name in old:
            print(old[name])
        continue
    recs = [json.loads(l) for l in open(path) if l.strip()]
    val = [(r["step"], 100 * (1 - r["splits"]["val"]["accuracy"])) for r in recs if r["splits"].get("val", {}).get("accuracy") is not None]
    if not val:
        continue
    best = min(val, key=lambda v: v[1])
    lee = recs[-1]["splits"]["val"].get("lee", {}).get("rotate", {}).get("mean")
    wall = ""
    summ = os.path.join(run, "summary.json")
    if os.path.exists(summ):
        w = json.load(open(summ)).get("wall_time_s")
        wall = f"{w / 60:.0f} min" if w else ""
    over = " ".join(s for s in sets if s != "--set")
    done = "" if os.path.exists(summ) else " (running)"
    print(f"| {name}{done} | {row} | `{over}` | {recs[-1]['epoch']:.1f} | {val[-1][1]:.2f}% | {best[1]:.2f}% ({best[0]}) | {lee:.3e} | {wall} |")
PY
    mv "$OUT.tmp" "$OUT"
    echo "table1_sweep: wrote $OUT" >&2
}

# Copy a finished run's config, metrics and summary next to the table.
keep_run() {
    mkdir -p "$KEEP/$1"
    cp "$RUNS/$1"/{config.toml,metrics.jsonl,summary.json} "$KEEP/$1/"
}

while read -r name row sets; do
    [[ -z $name || $name == \#* ]] && continue
    if [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]]; then continue; fi
    dir=$RUNS/$name
    if [[ -f $dir/summary.json ]]; then
        echo "table1_sweep: $name finished" >&2
        keep_run "$name"
        continue
    fi
    [[ ${TRAIN:-1} == 1 ]] || continue
    if [[ $sets == pretrain_from=* ]]; then
        read -r from sets <<< "$sets"
        from=$RUNS/${from#pretrain_from=}/pretrain
        if [[ ! -f $dir/checkpoint.safetensors ]]; then
            [[ -f $from/checkpoint.safetensors ]] || { echo "table1_sweep: $name needs $from; run it first" >&2; continue; }
            mkdir -p "$dir" && rm -rf "$dir/pretrain" && cp -r "$from" "$dir/pretrain"
        fi
    fi
    resume=()
    [[ -f $dir/checkpoint.safetensors || -f $dir/pretrain/checkpoint.safetensors ]] && resume=(--resume)
    echo "table1_sweep: $name ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    # shellcheck disable=SC2086
    "$BIN" train --config "$EXP/$row.toml" "${VAL[@]}" --set "name=\"$name\"" $sets "${resume[@]}" \
        >> "$RUNS/$name.log" 2>&1 || { echo "table1_sweep: $name failed; see $RUNS/$name.log" >&2; tail -5 "$RUNS/$name.log" >&2; }
    [[ -f $dir/summary.json ]] && keep_run "$name"
    summarise
done < "$LIST"
summarise
