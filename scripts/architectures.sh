#!/usr/bin/env bash
# Issue 34 at our scale: timm's ResNet-18 and ConvNeXt-Atto trained on MNIST-rot with Table 1's
# protocol (one seed; experiments/architectures/*.toml), their error and LEE on train / test /
# rotated Fashion-MNIST as a table beside Table 1's (experiments/architectures/table.md, from the
# runs' final evaluations), and a zoo of the trained checkpoints with Table 1's CNN on the same
# 2,000 test digits with the layerwise decomposition of their rotation / translation LEE
# (experiments/architectures/zoo/: table, Figure-1 view, layerwise bars and JSON per model).
#
#   LIEDERIV_DATA_DIR=/path/to/data scripts/architectures.sh
#
# Idempotent: a finished run (summary.json) is not trained again, an interrupted one resumes
# (`train --resume`). Environment: BIN (a prebuilt binary instead of `cargo build --release`),
# RAYON_NUM_THREADS. The runs live in runs/architectures/ (the zoo config reads them there);
# Table 1's cnn_aug checkpoint in runs/table1/ (scripts/table1.sh).
# Measured on the 2-core AMD EPYC machine (one thread, beside another one-thread job): ResNet-18
# 5625 steps at 55-76 images/s; ConvNeXt-Atto at ~25 images/s alone.
set -euo pipefail
cd "$(dirname "$0")/.."
EXP=experiments/architectures
RUNS=runs/architectures
if [[ -z ${BIN:-} ]]; then
    cargo build --release --locked
    BIN=${CARGO_TARGET_DIR:-target}/release/liederiv
fi
for row in resnet18 convnext_atto; do
    if [[ -f $RUNS/$row/summary.json ]]; then
        echo "architectures: $row is finished"
        continue
    fi
    resume=()
    [[ -d $RUNS/$row ]] && resume=(--resume)
    echo "architectures: training $row ($(date -u +%H:%M:%S) UTC)"
    "$BIN" train --config "$EXP/$row.toml" --set output.dir="$RUNS" "${resume[@]}"
done
"$BIN" report "$RUNS/resnet18" "$RUNS/convnext_atto" --markdown "$EXP/table.md"
rm -rf "$RUNS/zoo"
"$BIN" zoo --config "$EXP/zoo.toml" --set output.progress=false
# The results without the per-unit files (the PNGs are in runs/architectures/zoo/).
rm -rf "$EXP/zoo"
mkdir -p "$EXP/zoo/models"
cp "$RUNS"/zoo/zoo.md "$RUNS"/zoo/zoo.csv "$RUNS"/zoo/*.svg "$EXP/zoo/"
cp "$RUNS"/zoo/models/*.json "$RUNS"/zoo/models/*.csv "$RUNS"/zoo/models/*.svg "$EXP/zoo/models/"
