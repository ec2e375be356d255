#!/usr/bin/env bash
# liederiv vs PyTorch on the same CPU (issue 7): train step, forward, LEE JVP and peak memory per
# model, ours and PyTorch's, run side by side and alternating so that load drifts hit both alike.
#
#   scripts/bench.sh                      # all models, 3 rounds
#   ROUNDS=5 MODELS=vit_tiny,vit_small scripts/bench.sh
#   ROUNDS=0 scripts/bench.sh             # ViT-B/16's training memory per image only
#
# Environment: PYTHON (an interpreter with torch; default: .venv-bench/, created and filled with
# CPU torch on first use), MODELS (vit_tiny,vit_small,cnn,gcnn), ROUNDS (3), REPS (3 timed reps
# per round, after WARMUP=1), BATCH (128), THREADS (2), BENCH (a prebuilt `bench` binary, e.g. an
# older commit's for a before/after comparison; default: built here). Each (impl, model, round) is its own
# process, so peak memory is per model. Reported times are the median over rounds of each round's
# median; peak memory is the maximum. Then (VIT_BASE=1, the default) ViT-B/16's training memory
# per image, fused / portable / PyTorch, each also with gradient checkpointing. The last lines are
# (lower is better)
#   ratio_train_tiny=X ratio_train_small=Y ratio_lee_small=Z                 (ours / PyTorch)
#   ratio_mem_per_image_vit_base_checkpointed_fused=X ratio_mem_per_image_vit_base_checkpointed_portable=Y
#                                                      (ours checkpointed / ours without)
#   ratio_mem_per_image_vit_base_portable=X ratio_mem_per_image_vit_base_fused=Y   (ours / PyTorch)
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-vit_tiny,vit_small,cnn,gcnn}
ROUNDS=${ROUNDS:-3}
REPS=${REPS:-3}
WARMUP=${WARMUP:-1}
BATCH=${BATCH:-128}
THREADS=${THREADS:-2}
# The ratio line needs these two.
case ",$MODELS," in *,vit_tiny,*) ;; *) MODELS="vit_tiny,$MODELS" ;; esac
case ",$MODELS," in *,vit_small,*) ;; *) MODELS="$MODELS,vit_small" ;; esac

if [[ -z "${PYTHON:-}" ]]; then
    if [[ ! -x .venv-bench/bin/python ]]; then
        echo "bench: no \$PYTHON given; installing CPU PyTorch into .venv-bench/ (once)" >&2
        python3 -m venv .venv-bench
        # The CPU-only wheels where PyTorch's index is reachable, else PyPI's (which bring CUDA
        # libraries, unused here).
        .venv-bench/bin/pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch numpy ||
            .venv-bench/bin/pip install --quiet torch numpy
    fi
    PYTHON=.venv-bench/bin/python
fi
"$PYTHON" -c 'import torch' 2>/dev/null || { echo "bench: $PYTHON cannot import torch; set PYTHON to an interpreter that can" >&2; exit 1; }

if [[ -z ${BENCH:-} ]]; then
    echo "bench: building the Rust benchmark (release)" >&2
    cargo build --release --quiet --bin bench
    BENCH=${CARGO_TARGET_DIR:-target}/release/bench
fi

export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
common=(--batch "$BATCH" --warmup "$WARMUP" --reps "$REPS")
for round in $(seq 1 "$ROUNDS"); do
    for model in ${MODELS//,/ }; do
        # Alternate which side goes first, so neither always runs on a warmer (or busier) machine.
        if (( round % 2 )); then order="ours torch"; else order="torch ours"; fi
        for impl in $order; do
            if [[ $impl == ours ]]; then
                line=$("$BENCH" --models "$model" "${common[@]}")
            else
                line=$("$PYTHON" scripts/reference/bench_torch.py --models "$model" --threads "$THREADS" "${common[@]}" 2>/dev/null)
            fi
            echo "round=$round $line" | tee -a "$RESULTS" >&2
        done
    done
done

# ViT-B/16 (224 px, 3 channels) training memory per image, in processes that only train:
# (peak at batch 16 - peak at batch 8) / 8, so that weights, AdamW state and the runtime's own
# footprint cancel. Ours fused, ours portable (the composed ops CUDA runs: the GPU path's graph,
# measured here) and PyTorch eager; each again with gradient checkpointing (`_ckpt`; PyTorch's
# torch.utils.checkpoint per block). VIT_BASE=0 skips it (~10 min on 2 cores).
if [[ ${VIT_BASE:-1} == 1 ]]; then
    for batch in 8 16; do
        for form in fused portable torch fused_ckpt portable_ckpt torch_ckpt; do
            # One step from a fresh process, every buffer of 64 KiB or more mapped on its own and
            # unmapped when freed (glibc's MALLOC_MMAP_THRESHOLD_, for both sides; liederiv then
            # leaves the allocator alone): the peak is the live memory of the step's graph, not the
            # CPU heap's fragmentation (which the tuned heap adds: e.g. +39 MB per image for the
            # portable checkpointed form at the second step, then flat) and not a GPU's.
            vb=(--models vit_base --batch "$batch" --warmup 0 --reps 1 --train-only)
            [[ $form == *_ckpt ]] && vb+=(--grad-checkpointing)
            case $form in
                fused*) line=$(MALLOC_MMAP_THRESHOLD_=65536 "$BENCH" "${vb[@]}") ;;
                portable*) line=$(MALLOC_MMAP_THRESHOLD_=65536 "$BENCH" "${vb[@]}" --portable) ;;
                torch*) line=$(MALLOC_MMAP_THRESHOLD_=65536 "$PYTHON" scripts/reference/bench_torch.py \
                    --threads "$THREADS" "${vb[@]}" 2>/dev/null) ;;
            esac
            echo "membatch=$batch form=$form $line" | tee -a "$RESULTS" >&2
        done
    done
fi

echo "load while measuring: $(uptime)"
"$PYTHON" - "$RESULTS" "$MODELS" <<'EOF'
import statistics, sys
lines = [dict(kv.split("=", 1) for kv in line.split()) for line in open(sys.argv[1]) if line.strip()]
rows = [r for r in lines if "membatch" not in r]
mem = {(r["form"], int(r["membatch"])): r for r in lines if "membatch" in r}
models = sys.argv[2].split(",")

def stat(impl, model, key):
    vals = [float(r[key]) for r in rows if r["impl"] == impl and r["model"] == model]
    return max(vals) if key == "peak_mb" else statistics.median(vals)

keys = [("train_ms", "train ms"), ("forward_ms", "forward ms"), ("lee_ms", "LEE ms"), ("peak_mb", "peak MB")]
if rows:  # ROUNDS=0 measures ViT-B/16's memory only
    print(f"{'model':<10} {'metric':<11} {'ours':>10} {'pytorch':>10} {'ours/pt':>8}")
    ratio = {}
    for m in models:
        for key, label in keys:
            o, t = stat("ours", m, key), stat("torch", m, key)
            ratio[(m, key)] = o / t
            print(f"{m:<10} {label:<11} {o:>10.1f} {t:>10.1f} {o / t:>8.2f}")
    print(f"ratio_train_tiny={ratio[('vit_tiny', 'train_ms')]:.2f} "
          f"ratio_train_small={ratio[('vit_small', 'train_ms')]:.2f} "
          f"ratio_lee_small={ratio[('vit_small', 'lee_ms')]:.2f}")
if mem:
    per_image = {f: (float(mem[(f, 16)]["peak_mb"]) - float(mem[(f, 8)]["peak_mb"])) / 8
                 for f in ("fused", "portable", "torch", "fused_ckpt", "portable_ckpt", "torch_ckpt")}
    print(f"\nvit_base (ViT-B/16, 224 px, AdamW) training step, processes that only train:")
    print(f"{'form':<14} {'peak@8 MB':>10} {'peak@16 MB':>11} {'MB/image':>9} {'ms@16':>9}")
    for f, v in per_image.items():
        print(f"{f:<14} {float(mem[(f, 8)]['peak_mb']):>10.0f} {float(mem[(f, 16)]['peak_mb']):>11.0f} "
              f"{v:>9.1f} {float(mem[(f, 16)]['train_ms']):>9.0f}")
    t = per_image["torch"]
    print(f"ratio_mem_per_image_vit_base_checkpointed_fused={per_image['fused_ckpt'] / per_image['fused']:.2f} "
          f"ratio_mem_per_image_vit_base_checkpointed_portable={per_image['portable_ckpt'] / per_image['portable']:.2f}")
    print(f"ratio_mem_per_image_vit_base_portable={per_image['portable'] / t:.2f} "
          f"ratio_mem_per_image_vit_base_fused={per_image['fused'] / t:.2f}")
EOF
