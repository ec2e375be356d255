#!/usr/bin/env bash
# Table 1 of the paper (learned vs architectural rotation invariance on MNIST-rot) at CPU scale,
# with LEE (issue 8). Trains every row of experiments/table1/ (one config per row) for every seed,
# copies what the report needs from each run (config, metrics, summary; not checkpoints) to
# <report dir>/runs/<run>/, and regenerates <report dir>/RESULTS.md with `liederiv report --paper`
# (our table, mean ± std over seeds, the paper's numbers labelled as theirs, the error-vs-LEE plots,
# the per-row accuracy and LEE curves) after every row, so a stopped run still leaves a report of
# the rows it finished.
#
#   LIEDERIV_DATA_DIR=/path/to/data scripts/table1.sh            # the CPU table (experiments/table1/)
#   BUDGET=smoke scripts/table1.sh                               # a few steps per row, 1k test images
#   ROWS="cnn_noaug gcnn_c8" scripts/table1.sh                   # some rows only
#   BUDGET=gpu scripts/table1.sh                                 # the longer table on one GPU
#                                                                #   (experiments/table1/gpu/)
#
# Budgets: `full` is each row's config as committed (about an hour on this 2-core CPU, two rows at
# a time); `gpu` runs every row for three seeds, all 18 runs at once on one GPU (`--features cuda`
# build), for as many steps as fit FIT_SECONDS (default 480) of wall time: every run first trains
# 60 steps next to all the others, and each then gets the steps its measured throughput fits into
# what is left (its config.toml records them); `smoke` runs the whole chain for a few steps.
# FIT_SECONDS works with the other budgets too.
#
# mae_vit_c4avg trains nothing: it evaluates each mae_vit checkpoint (same seed) wrapped with
# C4 averaging (`liederiv eval --as-run`), so it runs after mae_vit and needs its checkpoints.
#
# After each run, its test error against an extra rotation of every image (`eval --angles
# $ANGLES`, default 0:360:15, on the first ANGLE_LIMIT test digits, default 2000) goes beside its
# metrics as angles.csv, and RESULTS.md overlays every row's curve (mean over its seeds).
#
# Run names: <row> for seed 0, <row>_s<seed> otherwise. Runs whose directory already holds a
# summary.json are not trained again (FORCE=1 retrains them from scratch), and a run that was
# interrupted continues from its last checkpoint (`train --resume`), so a stopped table picks up
# where it stopped. The runs themselves live in runs/table1/ (runs/table1_smoke/,
# runs/table1_gpu/; ignored by git).
#
# Measured runtime of the CPU table (2-core CPU, RAYON_NUM_THREADS=1, two to four runs at a time):
# the committed table (18 runs, three seeds per row) took 213 min elapsed in two sittings and 411
# min of run time; a C8 G-CNN run is the longest (2400 steps at ~0.9 s on an idle core, plus its
# final evaluation on the 50k test digits: ~45 min alone, 87-94 min next to three other runs),
# then MAE-ViT (15 min), the rest 4-7 min each. Per run: experiments/table1/RESULTS.md, "Runtime".
# BUDGET=smoke: a minute.
#
# Environment: LIEDERIV_DATA_DIR (MNIST and Fashion-MNIST IDX folders; without it the data come
# from the Hugging Face Hub), CARGO_TARGET_DIR (where the release binary is built), BIN (a prebuilt
# liederiv binary instead: no cargo build), BUDGET (full | smoke | gpu), ROWS, SEEDS (default "0";
# gpu: "0 1 2"), PARALLEL (1: all runs at once; gpu's default), DEVICE (cpu | cuda; gpu's default
# is cuda), FIT_SECONDS, FORCE, RUNS and REPORT (override the run and report directories),
# RAYON_NUM_THREADS (candle's CPU threads; default: all cores). On a machine shared with other jobs,
# RAYON_NUM_THREADS=1 is faster: with the load average at 9 on 2 cores, 10 tiny-ViT steps took
# 8.4-10.2 s on one thread against 20.5-22.5 s on two (the worker threads spin at their barriers
# while the other one is descheduled). The committed CPU table was made with RAYON_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

EXP=experiments/table1
ALL_ROWS="mae_vit mae_vit_c4avg vit_scratch mae_vit_lee cnn_noaug cnn_aug gcnn_c8"
ROWS=${ROWS:-"mae_vit mae_vit_c4avg vit_scratch gcnn_c8 cnn_aug cnn_noaug mae_vit_lee"}
BUDGET=${BUDGET:-full}
FORCE=${FORCE:-0}
FIT_SECONDS=${FIT_SECONDS:-}

case "$BUDGET" in
    full)
        RUNS=${RUNS:-runs/table1}
        REPORT=${REPORT:-$EXP}
        SET=()
        ;;
    smoke)
        # Every stage runs a few steps, evaluates twice and reports on the first 1k test digits.
        RUNS=${RUNS:-runs/table1_smoke}
        REPORT=${REPORT:-$RUNS/report}
        SET=(--set train.steps=4 --set train.warmup_steps=1 --set train.eval_every=2
            --set train.checkpoint_every=4 --set pretrain.steps=4 --set pretrain.warmup_steps=1
            --set data.test_size=1000 --set eval.limit=256 --set lee.limit=16)
        ;;
    gpu)
        RUNS=${RUNS:-runs/table1_gpu}
        REPORT=${REPORT:-$EXP/gpu}
        SEEDS=${SEEDS:-"0 1 2"}
        PARALLEL=${PARALLEL:-1}
        DEVICE=${DEVICE:-cuda}
        FIT_SECONDS=${FIT_SECONDS:-420}
        SET=()
        ;;
    *)
        echo "table1: BUDGET must be full, smoke or gpu, not $BUDGET" >&2
        exit 2
        ;;
esac
SEEDS=${SEEDS:-0}
PARALLEL=${PARALLEL:-0}
ANGLES=${ANGLES:-0:360:15}
ANGLE_LIMIT=${ANGLE_LIMIT:-2000}
[[ $BUDGET != smoke ]] || ANGLE_LIMIT=200
DEVICE=${DEVICE:-}
[[ -z $DEVICE ]] || SET+=(--set "device=\"$DEVICE\"")

# The GPU recipe of a row, on top of its config. These models are too small to fill a GPU: a step
# costs about its kernel launches whatever the batch, so every stage trains at batch 512 (4× the
# epochs of batch 128 in the same time), with the peak lr at 2e-3 (base_lr × 512 / 256; the CPU
# recipes' 1e-3 at batch 64-128, raised by √4 rather than 4×: Adam at 4e-3 is unsafe for the ViT).
row_set() {
    [[ $BUDGET == gpu ]] || return 0
    echo --set train.batch_size=512 --set train.base_lr=1e-3
    case $1 in
        mae_vit | mae_vit_lee) echo --set pretrain.batch_size=512 --set pretrain.base_lr=1e-3 ;;
    esac
}

# `--set` overrides for a run of `pre` pretraining and `fin` training steps: ten evaluations and
# four checkpoints per stage, warmup 5% of the steps.
steps_set() {
    local pre=$1 fin=$2
    local out=(--set "train.steps=$fin" --set "train.warmup_steps=$(((fin + 19) / 20))"
        --set "train.eval_every=$(((fin + 9) / 10))" --set "train.checkpoint_every=$(((fin + 3) / 4))")
    if [[ $pre -gt 0 ]]; then
        out+=(--set "pretrain.steps=$pre" --set "pretrain.warmup_steps=$(((pre + 19) / 20))")
    fi
    echo "${out[@]}"
}

if [[ -n ${BIN:-} ]]; then
    [[ -x $BIN ]] || { echo "table1: BIN=$BIN is not an executable" >&2; exit 2; }
else
    cargo build --release --bin liederiv
    BIN=${CARGO_TARGET_DIR:-target}/release/liederiv
fi
mkdir -p "$RUNS" "$REPORT/runs"

min_s() { printf '%d min %02d s' $(($1 / 60)) $(($1 % 60)); }

run_name() { if [[ $2 == 0 ]]; then echo "$1"; else echo "$1_s$2"; fi; }

report() {
    local dirs=() row d
    for row in $ALL_ROWS; do
        for d in "$REPORT/runs/$row" "$REPORT/runs/${row}"_s*; do
            [[ -f "$d/metrics.jsonl" ]] && dirs+=("$d")
        done
    done
    [[ ${#dirs[@]} -gt 0 ]] || return 0
    "$BIN" report "${dirs[@]}" --markdown "$REPORT/table.md" --paper "$EXP/paper.toml" > /dev/null
    # A report folder of its own (the GPU table's, or REPORT=...) brings its own header and
    # discussion; the CPU table's are experiments/table1/'s.
    local header=$EXP/header.md discussion=$EXP/discussion.md
    if [[ -f $REPORT/header.md ]]; then header=$REPORT/header.md discussion=$REPORT/discussion.md; fi
    {
        cat "$header"
        echo
        cat "$REPORT/table.md"
        echo
        echo "## Plots"
        echo
        echo "Test error against test LEE (the paper's Figure 1-right view; one marker per row, mean"
        echo "over its seeds with ±1 std bars, when rows have several seeds; one point per run otherwise):"
        echo "rotation ![error vs rotation LEE](table_error_vs_lee_rotate.svg),"
        echo "[translate_x](table_error_vs_lee_translate_x.svg), [translate_y](table_error_vs_lee_translate_y.svg)."
        echo
        if [[ -f $REPORT/table_angles.svg ]]; then
            echo "Test error against an extra rotation θ of every test image ($ANGLES degrees, the first"
            echo "$ANGLE_LIMIT test digits; a row with several seeds is their mean):"
            echo "![test error against rotation angle](table_angles.svg)"
            echo
        fi
        echo "Per row, rotation LEE over training on train / test / OOD, mean over seeds with the min–max band:"
        echo
        for row in $ALL_ROWS; do
            if [[ -f $REPORT/table_lee_$row.svg ]]; then
                echo "- \`$row\`: [rotation LEE over seeds](table_lee_$row.svg)"
            fi
        done
        echo
        echo "Per run, LEE over training on train / test / OOD and accuracy over training:"
        echo
        for d in "${dirs[@]}"; do
            row=$(basename "$d")
            echo "- \`$row\`: [LEE curves](runs/$row/lee.svg), [accuracy and loss](runs/$row/accuracy.svg)"
        done
        echo
        echo "## Runtime"
        echo
        echo "Measured by scripts/table1.sh (BUDGET=$BUDGET), wall clock per run including its final"
        echo "evaluation (load average of the machine at the start of each run):"
        echo
        cat "$REPORT/runtime.md"
        [[ -f $discussion && $BUDGET != smoke ]] && { echo; cat "$discussion"; }
    } > "$REPORT/RESULTS.md"
    echo "table1: wrote $REPORT/RESULTS.md" >&2
}

# The angle curve of a finished run (row, seed), into its report folder; kept when it is there.
angle_run() {
    local row=$1 seed=$2 name ckpt
    name=$(run_name "$row" "$seed")
    [[ -f $REPORT/runs/$name/angles.csv && $FORCE == 0 ]] && return 0
    ckpt=$RUNS/$name/checkpoint.safetensors
    # The evaluation-only row measures mae_vit's checkpoint of its seed, C4-averaged.
    [[ $row != mae_vit_c4avg ]] || ckpt=$RUNS/$(run_name mae_vit "$seed")/checkpoint.safetensors
    echo "table1: angle curve of $name ($ANGLES on $ANGLE_LIMIT test digits)" >&2
    "$BIN" eval --checkpoint "$ckpt" --config "$EXP/$row.toml" --set "output.dir=\"$RUNS\"" \
        --set "name=\"$name\"" --set "seed=$seed" "${SET[@]}" --splits test --limit "$ANGLE_LIMIT" \
        --angles "$ANGLES" >> "$RUNS/$name.log" 2>&1 || {
        echo "table1: the angle curve of $name failed; see $RUNS/$name.log" >&2
        return 1
    }
    cp "$RUNS/$name/angles.csv" "$REPORT/runs/$name/"
}

# Train one run (row, seed) with extra `--set` arguments; on success copy what the report needs.
train_run() {
    local row=$1 seed=$2
    shift 2
    local name dir
    name=$(run_name "$row" "$seed")
    dir=$RUNS/$name
    if [[ -f "$dir/summary.json" && "$FORCE" == 0 ]]; then
        echo "table1: $name already finished in $dir (FORCE=1 retrains it)" >&2
    elif [[ $row == mae_vit_c4avg ]]; then
        # Evaluation only: mae_vit's checkpoint of the same seed, C4-averaged at test time.
        local base
        base=$RUNS/$(run_name mae_vit "$seed")/checkpoint.safetensors
        [[ -f $base ]] || {
            echo "table1: $name evaluates $base, which does not exist; run mae_vit first" >&2
            return 1
        }
        rm -rf "$dir"
        local load start
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        start=$(date +%s)
        echo "table1: evaluating $name ($(date -u +%H:%M:%S) UTC, load $load)" >&2
        "$BIN" eval --as-run --checkpoint "$base" --config "$EXP/$row.toml" --set "output.dir=\"$RUNS\"" \
            --set "name=\"$name\"" --set "seed=$seed" "${SET[@]}" "$@" >> "$RUNS/$name.log" 2>&1 || {
            echo "table1: $name failed; see $RUNS/$name.log" >&2
            tail -5 "$RUNS/$name.log" >&2
            return 1
        }
        printf '| %s | %s (evaluation only) | %s |\n' "$name" "$(min_s $(($(date +%s) - start)))" "$load" >> "$REPORT/runtime.md"
    else
        [[ "$FORCE" == 0 ]] || rm -rf "$dir"
        local first=$RUNS/$(run_name mae_vit "$seed") copied=0
        if [[ $row == mae_vit_lee && $PARALLEL == 0 && ! -f $dir/checkpoint.safetensors ]]; then
            # Same MAE pretraining as mae_vit: the trainer reuses a finished pretrain stage (run
            # in parallel, each row pretrains itself: same config and seed).
            [[ -f $first/pretrain/checkpoint.safetensors ]] || {
                echo "table1: $name needs $(basename "$first")'s pretraining; run mae_vit first" >&2
                return 1
            }
            mkdir -p "$dir"
            rm -rf "$dir/pretrain"
            cp -r "$first/pretrain" "$dir/pretrain"
            copied=1
        fi
        # A folder holding a run (a checkpoint of either stage, the copied pretraining included)
        # is continued; `train` refuses to start over in it.
        local resume=() continued=0
        if [[ -f $dir/checkpoint.safetensors || -f $dir/pretrain/checkpoint.safetensors ]]; then
            resume=(--resume)
            [[ $copied == 1 ]] || continued=1
        fi
        local load start
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        start=$(date +%s)
        echo "table1: training $name ($(date -u +%H:%M:%S) UTC, load $load)" >&2
        "$BIN" train --config "$EXP/$row.toml" --set "output.dir=\"$RUNS\"" --set "name=\"$name\"" \
            --set "seed=$seed" "${SET[@]}" $(row_set "$row") "$@" "${resume[@]}" >> "$RUNS/$name.log" 2>&1 || {
            echo "table1: $name failed; see $RUNS/$name.log" >&2
            tail -5 "$RUNS/$name.log" >&2
            return 1
        }
        # The wall clock of this invocation; a continued run adds the whole run's time from its
        # summary.json (the trainer carries the time of earlier processes in its checkpoints,
        # not that of a copied pretraining stage; null when a checkpoint predates that record).
        local secs=$(($(date +%s) - start)) note="" total
        if [[ $continued == 1 ]]; then
            total=$(sed -n 's/.*"wall_time_s": *\([0-9][0-9]*\).*/\1/p' "$dir/summary.json")
            if [[ -n $total ]]; then
                note=" (this invocation, resumed; the whole run: $(min_s "$total"), from its summary.json)"
            else
                note=" (this invocation, resumed; earlier processes untimed: their checkpoint predates the record)"
            fi
        fi
        if [[ $row == mae_vit_lee && $PARALLEL == 0 ]]; then
            note+=" (fine-tuning only: the pretraining stage is $(basename "$first")'s, copied)"
        fi
        printf '| %s | %s%s | %s |\n' "$name" "$(min_s "$secs")" "$note" "$load" >> "$REPORT/runtime.md"
    fi
    mkdir -p "$REPORT/runs/$name"
    cp "$dir"/{config.toml,metrics.jsonl,metrics.csv,summary.json} "$REPORT/runs/$name/"
    if [[ -f $dir/pretrain/metrics.jsonl ]]; then
        mkdir -p "$REPORT/runs/$name/pretrain"
        cp "$dir/pretrain/metrics.jsonl" "$REPORT/runs/$name/pretrain/"
    fi
    angle_run "$row" "$seed"
}

# The `--set` step overrides of one run under FIT_SECONDS (none otherwise: the config's own;
# none for the evaluation-only row).
budget_steps() {
    [[ -z $FIT_SECONDS || $1 == mae_vit_c4avg ]] || cat "$RUNS/fit/$(run_name "$1" "$2").steps"
}

# The rows that train (the evaluation-only row follows its trained one).
trained_rows() {
    local row
    for row in $ROWS; do [[ $row == mae_vit_c4avg ]] || echo "$row"; done
}

# FIT_SECONDS: 60 steps of every run at once (the contention of the real thing), then the steps
# that each run's measured throughput fits into what is left of FIT_SECONDS, less a reserve for
# the final evaluations.
fit_steps() {
    local t0=$1 pids=() row seed name
    mkdir -p "$RUNS/fit"
    for row in $(trained_rows); do
        for seed in $SEEDS; do
            name=$(run_name "$row" "$seed")
            "$BIN" train --config "$EXP/$row.toml" --set "output.dir=\"$RUNS/fit\"" --set "name=\"$name\"" \
                --set "seed=$seed" "${SET[@]}" $(row_set "$row") --set train.steps=60 --set train.eval_every=30 \
                --set train.checkpoint_every=60 --set train.warmup_steps=5 --set pretrain.steps=60 \
                --set pretrain.warmup_steps=5 --set data.test_size=1000 --overwrite > "$RUNS/fit/$name.log" 2>&1 &
            pids+=($!)
        done
    done
    local failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    [[ $failed == 0 ]] || { echo "table1: a fitting run failed; see $RUNS/fit/*.log" >&2; return 1; }
    local left=$((FIT_SECONDS - ($(date +%s) - t0)))
    for row in $(trained_rows); do
        for seed in $SEEDS; do
            name=$(run_name "$row" "$seed")
            python3 - "$RUNS/fit/$name" "$left" > "$RUNS/fit/$name.sps" <<'EOF'
import json, os, sys
run, left = sys.argv[1], float(sys.argv[2])
def sec_per_step(path, batch):
    last = [json.loads(l) for l in open(path)][-1]    # steps 31-60: past start-up and warm-up
    return batch / last["images_per_sec"]
cfg = open(os.path.join(run, "config.toml")).read()
batch = lambda section: int(cfg.split(f"[{section}]")[1].split("batch_size = ")[1].split()[0])
# Reserve 60 s for the final 50k-image evaluation and LEE; periodic evaluations take ~15%.
avail = max(left - 60.0, 10.0) * 0.85
fin_t = sec_per_step(os.path.join(run, "metrics.jsonl"), batch("train"))
pre_path = os.path.join(run, "pretrain", "metrics.jsonl")
hundreds = lambda secs, t: max(int(secs / t) // 100 * 100, 100)
if os.path.exists(pre_path):
    pre_t = sec_per_step(pre_path, batch("pretrain"))
    pre, fin = hundreds(0.4 * avail, pre_t), hundreds(0.6 * avail, fin_t)
else:
    pre_t, pre, fin = 0.0, 0, hundreds(avail, fin_t)
print(pre, fin, round(fin_t * 1e3, 1), round(pre_t * 1e3, 1))
EOF
            read -r pre fin fin_ms pre_ms < "$RUNS/fit/$name.sps"
            echo "table1: fit $name: ${fin_ms} ms/step (pretraining ${pre_ms}) → $pre pretraining + $fin steps" >&2
            steps_set "$pre" "$fin" > "$RUNS/fit/$name.steps"
        done
    done
}

t0=$(date +%s)
[[ -f "$REPORT/runtime.md" && "$FORCE" == 0 ]] || printf '| run | wall time | load average at start |\n| :-- | --: | :-- |\n' > "$REPORT/runtime.md"
[[ -z $FIT_SECONDS || -z ${ROWS// /} ]] || fit_steps "$t0"
failed=0
if [[ $PARALLEL == 1 ]]; then
    pids=()
    for row in $(trained_rows); do
        for seed in $SEEDS; do
            # shellcheck disable=SC2046
            train_run "$row" "$seed" $(budget_steps "$row" "$seed") &
            pids+=($!)
        done
    done
    for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
    if [[ " $ROWS " == *" mae_vit_c4avg "* ]]; then
        for seed in $SEEDS; do train_run mae_vit_c4avg "$seed" || failed=$((failed + 1)); done
    fi
else
    for row in $ROWS; do
        for seed in $SEEDS; do
            # shellcheck disable=SC2046
            train_run "$row" "$seed" $(budget_steps "$row" "$seed") || { failed=1; break 2; }
            report
        done
    done
fi
report
echo "table1: $(($(date +%s) - t0)) s in all, $failed failed run(s)" >&2
exit $((failed > 0))
