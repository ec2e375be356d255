#!/usr/bin/env bash
# The GPU half of issue 9, in one run on a machine with an NVIDIA GPU (repo root as working
# directory), using the binaries scripts/build_cuda.sh put in dist-cuda/:
#   1. nvidia-smi and the CUDA libraries the binaries resolve;
#   2. tests/cuda.rs: LEE, loss / LEE-penalty / MAE gradients, AdamW steps and warps, GPU vs CPU
#      on the same weights (1e-4 relative);
#   3. the quickstart trained on the GPU, then `liederiv lee` on its checkpoint on GPU and CPU;
#   4. bench on the GPU: the four CPU-scale models (batch 128) and ViT-B/16 at 224 px (batch 64), ours and, when
#      python3 has torch, PyTorch's in the same run;
#   5. ViT-B/16 training at batch 64 side by side (issue 32): ours f32 / bf16 / f32 checkpointed
#      against PyTorch eager f32 / bf16 autocast (and checkpointed), images/s and peak GPU memory
#      (nvidia-smi sampled every 50 ms: context and allocator caches included, alike for both),
#      with the ratio lines `ratio_images_per_s_vit_base_FORM=X ratio_gpu_mem_vit_base_FORM=Y`.
#
#   LIEDERIV_DATA_DIR=/path/to/data scripts/gpu_check.sh      # default data: .gpu-data/
# Logs go to $OUT (default gpu-check/). Each step reports and the script goes on after a failure;
# the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
RUNS=${RUNS:-/tmp/liederiv-gpu-runs}
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh

failed=0
step() {
    local name=$1
    shift
    echo
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "=== $name: ok in $((SECONDS - t0)) s"
    else
        echo "=== $name: FAILED after $((SECONDS - t0)) s"
        failed=$((failed + 1))
    fi
}

step smi bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv && ldd $BIN/liederiv | grep -E 'cuda|cublas|curand|nvrtc'"
step tests "$BIN/cuda_tests" --test-threads=1 --nocapture
step quickstart "$BIN/liederiv" train --config configs/quickstart.toml --set device=cuda --set "output.dir=$RUNS"
ckpt=$RUNS/quickstart/checkpoint.safetensors
for dev in cuda cpu; do
    step "lee_$dev" "$BIN/liederiv" lee --config configs/quickstart.toml --checkpoint "$ckpt" --set device=$dev \
        --limit 256 --transforms rotate,translate_x,scale --json "$OUT/lee_$dev.json"
done
step lee_compare python3 - "$OUT/lee_cuda.json" "$OUT/lee_cpu.json" <<'EOF'
import json, sys
g, c = (json.load(open(p)) for p in sys.argv[1:])
worst = 0.0
def walk(a, b, path):
    global worst
    if isinstance(a, dict):
        for k in a: walk(a[k], b[k], path + "." + k)
    elif isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)): walk(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and path.endswith(("mean", "stderr")):
        rel = abs(a - b) / max(abs(b), 1e-30)
        worst = max(worst, rel)
        if "rotate" in path and path.endswith("mean"): print(f"{path}: gpu {a:.6e} cpu {b:.6e} rel {rel:.1e}")
walk(g, c, "")
print(f"worst relative difference of LEE means/stderrs GPU vs CPU: {worst:.2e}")
sys.exit(0 if worst < 1e-4 else 1)
EOF
step bench_ours "$BIN/bench" --device cuda --models vit_tiny,vit_small,cnn,gcnn --batch 128 --reps 5
step bench_ours_base "$BIN/bench" --device cuda --models vit_base --batch 64 --reps 5
if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    step bench_torch python3 scripts/reference/bench_torch.py --device cuda --models vit_tiny,vit_small,cnn,gcnn --batch 128 --reps 5
    step bench_torch_base python3 scripts/reference/bench_torch.py --device cuda --models vit_base --batch 64 --reps 5
fi
# 5. One process per form, so that each peak is its own.
gpu_peak() {
    local log=$1
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$log.mem" &
    local smi=$!
    "$@" > "$log" 2>&1
    local rc=$?
    kill "$smi"
    wait "$smi" 2>/dev/null
    echo "$(grep '^impl=' "$log" | tail -1) gpu_peak_mib=$(sort -n "$log.mem" | tail -1)"
    return $rc
}
forms() {
    local vb=(--device cuda --models vit_base --batch 64 --warmup 2 --reps 5 --train-only)
    gpu_peak "$OUT/form_ours_f32.txt" "$BIN/bench" "${vb[@]}"
    gpu_peak "$OUT/form_ours_bf16.txt" "$BIN/bench" "${vb[@]}" --bf16
    gpu_peak "$OUT/form_ours_ckpt.txt" "$BIN/bench" "${vb[@]}" --grad-checkpointing
    gpu_peak "$OUT/form_ours_bf16_ckpt.txt" "$BIN/bench" "${vb[@]}" --bf16 --grad-checkpointing
    if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
        local t=(python3 scripts/reference/bench_torch.py --threads 16 "${vb[@]}")
        gpu_peak "$OUT/form_torch_f32.txt" "${t[@]}"
        gpu_peak "$OUT/form_torch_bf16.txt" "${t[@]}" --bf16
        gpu_peak "$OUT/form_torch_ckpt.txt" "${t[@]}" --grad-checkpointing
    fi
}
step vit_base_forms forms
step vit_base_summary python3 - "$OUT/vit_base_forms.log" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    if not line.startswith("impl="):
        continue
    r = dict(kv.split("=", 1) for kv in line.split())
    name = f"{r['impl']}_{r.get('precision', 'f32')}" + ("_ckpt" if r.get("grad_checkpointing") in ("true", "True") else "")
    rows[name] = (64 / (float(r["train_ms"]) / 1e3), float(r.get("gpu_peak_mib", "nan")))
print(f"{'form':<16} {'images/s':>9} {'peak MiB':>9}")
for name, (ips, mem) in rows.items():
    print(f"{name:<16} {ips:>9.1f} {mem:>9.0f}")
# Ours against PyTorch's like for like: f32 and checkpointed against eager f32, bf16 against autocast.
pairs = [("f32", "ours_f32", "torch_f32"), ("bf16", "ours_bf16", "torch_bf16"), ("checkpointed", "ours_f32_ckpt", "torch_f32")]
for label, ours, torch in pairs:
    if ours in rows and torch in rows:
        print(f"ratio_images_per_s_vit_base_{label}={rows[ours][0] / rows[torch][0]:.2f} "
              f"ratio_gpu_mem_vit_base_{label}={rows[ours][1] / rows[torch][1]:.2f}")
EOF
cp "$RUNS/quickstart/summary.json" "$OUT/quickstart_summary.json" 2>/dev/null
echo
echo "gpu_check: $failed failed step(s); logs in $OUT"
exit $failed
