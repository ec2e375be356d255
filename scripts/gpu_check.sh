#!/usr/bin/env bash
# The GPU half of issue 9, in one run on a machine with an NVIDIA GPU (repo root as working
# directory), using the binaries scripts/build_cuda.sh put in dist-cuda/:
#   1. nvidia-smi and the CUDA libraries the binaries resolve;
#   2. tests/cuda.rs: LEE, loss / LEE-penalty / MAE gradients, AdamW steps and warps, GPU vs CPU
#      on the same weights (1e-4 relative);
#   3. the quickstart trained on the GPU, then `liederiv lee` on its checkpoint on GPU and CPU;
#   4. bench on the GPU: the four CPU-scale models (batch 128) and ViT-B/16 at 224 px (batch 64), ours and, when
#      python3 has torch, PyTorch's in the same run.
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
cp "$RUNS/quickstart/summary.json" "$OUT/quickstart_summary.json" 2>/dev/null
echo
echo "gpu_check: $failed failed step(s); logs in $OUT"
exit $failed
