#!/usr/bin/env bash
# Table 1 of the paper (learned vs architectural rotation invariance on MNIST-rot) at CPU scale,
# with LEE (issue 8). Trains every row of experiments/table1/ (one config per row), copies what
# the report needs from each run (config, metrics, summary; not checkpoints) to
# experiments/table1/runs/<row>/, and regenerates experiments/table1/RESULTS.md with
# `liederiv report --paper` (our table, the paper's numbers labelled as theirs, the error-vs-LEE
# plots, the per-row accuracy and LEE curves) after every row, so a stopped run still leaves a
# report of the rows it finished.
#
#   LIEDERIV_DATA_DIR=/path/to/data scripts/table1.sh            # the full table
#   BUDGET=smoke scripts/table1.sh                               # a few steps per row, 1k test images
#   ROWS="cnn_noaug gcnn_c8" scripts/table1.sh                   # some rows only
#
# Measured runtime of the full table (one seed per row, 2-core CPU with a load average of 5-11
# from other jobs, RAYON_NUM_THREADS=1): the rows' wall times sum to about 85 min (the C8 G-CNN
# alone 33 min, its final evaluation on the 50k test digits included); 72 min elapsed with two rows
# at a time. Per row: experiments/table1/RESULTS.md, "Runtime". BUDGET=smoke: about a minute.
# Rows whose run directory already holds a summary.json are not trained again (FORCE=1 retrains
# them from scratch), and a row that was interrupted continues from its last checkpoint
# (`train --resume`), so a stopped table picks up where it stopped. The runs themselves live in
# runs/table1/ (runs/table1_smoke/ for the smoke budget; both ignored by git).
#
# Environment: LIEDERIV_DATA_DIR (MNIST and Fashion-MNIST IDX folders; without it the data come
# from the Hugging Face Hub), CARGO_TARGET_DIR (where the release binary is built), BUDGET
# (full | smoke), ROWS, FORCE, RAYON_NUM_THREADS (candle's CPU threads; default: all cores). On a
# machine shared with other jobs, RAYON_NUM_THREADS=1 is faster: with the load average at 9 on 2
# cores, 10 tiny-ViT steps took 8.4-10.2 s on one thread against 20.5-22.5 s on two (the worker
# threads spin at their barriers while the other one is descheduled). The committed table was made
# with RAYON_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/.."

EXP=experiments/table1
ROWS=${ROWS:-"mae_vit vit_scratch gcnn_c8 cnn_aug cnn_noaug mae_vit_lee"}
BUDGET=${BUDGET:-full}
FORCE=${FORCE:-0}

case "$BUDGET" in
    full)
        RUNS=runs/table1
        OUT=$EXP
        SET=()
        ;;
    smoke)
        # Every stage runs a few steps, evaluates twice and reports on the first 1k test digits.
        RUNS=runs/table1_smoke
        OUT=$RUNS/report
        SET=(--set train.steps=4 --set train.warmup_steps=1 --set train.eval_every=2
            --set train.checkpoint_every=4 --set pretrain.steps=4 --set pretrain.warmup_steps=1
            --set data.test_size=1000 --set eval.limit=256 --set lee.limit=16)
        ;;
    *)
        echo "table1: BUDGET must be full or smoke, not $BUDGET" >&2
        exit 2
        ;;
esac

cargo build --release --bin liederiv
BIN=${CARGO_TARGET_DIR:-target}/release/liederiv
mkdir -p "$RUNS" "$OUT/runs"

report() {
    local dirs=()
    for row in mae_vit vit_scratch mae_vit_lee cnn_noaug cnn_aug gcnn_c8; do
        [[ -f "$OUT/runs/$row/metrics.jsonl" ]] && dirs+=("$OUT/runs/$row")
    done
    [[ ${#dirs[@]} -gt 0 ]] || return 0
    "$BIN" report "${dirs[@]}" --markdown "$OUT/table.md" --paper "$EXP/paper.toml" > /dev/null
    {
        cat "$EXP/header.md"
        echo
        cat "$OUT/table.md"
        echo
        echo "## Plots"
        echo
        echo "Test error against test LEE, one point per row (the paper's Figure 1-right view):"
        echo "rotation ![error vs rotation LEE](table_error_vs_lee_rotate.svg),"
        echo "[translate_x](table_error_vs_lee_translate_x.svg), [translate_y](table_error_vs_lee_translate_y.svg)."
        echo
        echo "Per row, LEE over training on train / test / OOD and accuracy over training:"
        echo
        for d in "${dirs[@]}"; do
            row=$(basename "$d")
            echo "- \`$row\`: [LEE curves](runs/$row/lee.svg), [accuracy and loss](runs/$row/accuracy.svg)"
        done
        echo
        echo "## Runtime"
        echo
        echo "Measured by scripts/table1.sh (BUDGET=$BUDGET), wall clock per row including its final"
        echo "evaluation, on a 2-core CPU shared with other jobs (load average at the start of each row):"
        echo
        cat "$OUT/runtime.md"
        [[ -f "$EXP/discussion.md" && "$BUDGET" == full ]] && { echo; cat "$EXP/discussion.md"; }
    } > "$OUT/RESULTS.md"
    echo "table1: wrote $OUT/RESULTS.md" >&2
}

[[ -f "$OUT/runtime.md" && "$FORCE" == 0 ]] || printf '| row | wall time | load average at start |\n| :-- | --: | :-- |\n' > "$OUT/runtime.md"
for row in $ROWS; do
    dir=$RUNS/$row
    trained=0
    if [[ -f "$dir/summary.json" && "$FORCE" == 0 ]]; then
        echo "table1: $row already finished in $dir (FORCE=1 retrains it)" >&2
    else
        [[ "$FORCE" == 0 ]] || rm -rf "$dir"
        resume=()
        if [[ -f $dir/checkpoint.safetensors || -f $dir/pretrain/checkpoint.safetensors ]]; then
            resume=(--resume)
        fi
        if [[ $row == mae_vit_lee && ! -f $dir/checkpoint.safetensors ]]; then
            # Same MAE pretraining as mae_vit: the trainer reuses a finished pretrain stage.
            [[ -f $RUNS/mae_vit/pretrain/checkpoint.safetensors ]] || {
                echo "table1: mae_vit_lee needs mae_vit's pretraining; run mae_vit first" >&2
                exit 1
            }
            mkdir -p "$dir"
            rm -rf "$dir/pretrain"
            cp -r "$RUNS/mae_vit/pretrain" "$dir/pretrain"
        fi
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        start=$(date +%s)
        echo "table1: training $row ($(date -u +%H:%M:%S) UTC, load $load)" >&2
        "$BIN" train --config "$EXP/$row.toml" --set "output.dir=\"$RUNS\"" "${SET[@]}" "${resume[@]}" \
            >> "$RUNS/$row.log" 2>&1 || {
            echo "table1: $row failed; see $RUNS/$row.log" >&2
            tail -5 "$RUNS/$row.log" >&2
            exit 1
        }
        secs=$(($(date +%s) - start))
        printf '| %s | %d min %02d s%s | %s |\n' "$row" $((secs / 60)) $((secs % 60)) \
            "${resume:+ (resumed: this invocation only)}" "$load" >> "$OUT/runtime.md"
        trained=1
    fi
    mkdir -p "$OUT/runs/$row"
    cp "$dir"/{config.toml,metrics.jsonl,metrics.csv,summary.json} "$OUT/runs/$row/"
    if [[ -f $dir/pretrain/metrics.jsonl ]]; then
        mkdir -p "$OUT/runs/$row/pretrain"
        cp "$dir/pretrain/metrics.jsonl" "$OUT/runs/$row/pretrain/"
    fi
    # A report after every trained row, so a stopped table still shows the rows it finished.
    if [[ $trained == 1 ]]; then report; fi
done
report
