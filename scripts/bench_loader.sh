#!/usr/bin/env bash
# The photo loader alone at 224 px (issue 33's bench line): images/s of liederiv's loader
# (decode + timm's eval / train transforms on the rayon pool, `bench --loader`) against PyTorch's
# DataLoader + torchvision (num_workers = THREADS) on the same files and cores.
#
#   scripts/bench_loader.sh            # THREADS=2 IMAGES=256 BATCH=64 REPS=3
#
# The files: IMAGES JPEGs of ImageNet's typical size (500×375 or 375×500, quality 90) cut from
# scikit-image's sample photos, made once under .cache/bench_photos/. Needs .venv-bench (torch,
# torchvision, scikit-image, pillow; see scripts/bench.sh). Last line:
#   ratio_images_per_s_loader_eval=X ratio_images_per_s_loader_train=Y   (ours / PyTorch)
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
IMAGES=${IMAGES:-256}
BATCH=${BATCH:-64}
REPS=${REPS:-3}
PYTHON=${PYTHON:-.venv-bench/bin/python}
DIR=.cache/bench_photos/$IMAGES

if [[ ! -d $DIR/train ]]; then
    "$PYTHON" - "$DIR" "$IMAGES" <<'PY'
import pathlib, sys
import numpy as np, skimage.data
from PIL import Image
out, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
photos = {"astronaut": skimage.data.astronaut, "cat": skimage.data.chelsea,
          "coffee": skimage.data.coffee, "rocket": skimage.data.rocket}
rng = np.random.default_rng(0)
for i in range(n):
    cls = list(photos)[i % len(photos)]
    img = Image.fromarray(photos[cls]())
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.5, 1.0))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    size = (500, 375) if rng.random() < 0.75 else (375, 500)
    d = out / "train" / cls
    d.mkdir(parents=True, exist_ok=True)
    img.crop((x0, y0, x0 + side, y0 + side)).resize(size, Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
print(f"bench_loader: wrote {n} JPEGs under {out}", file=sys.stderr)
PY
fi

if [[ -z ${BENCH:-} ]]; then
    cargo build --release --quiet --bin bench
    BENCH=${CARGO_TARGET_DIR:-target}/release/bench
fi
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=1
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
"$BENCH" --loader "$DIR" --batch "$BATCH" --warmup 1 --reps "$REPS" | tee -a "$RESULTS"
"$PYTHON" scripts/reference/bench_loader.py --folder "$DIR" --batch "$BATCH" --threads "$THREADS" --warmup 1 --reps "$REPS" | tee -a "$RESULTS"
echo "load while measuring: $(uptime)"
"$PYTHON" - "$RESULTS" <<'PY'
import sys
rate = {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split())
    rate[(kv["impl"], kv["model"])] = float(kv["images_per_s"])
print(" ".join(f"ratio_images_per_s_{m}={rate[('ours', m)] / rate[('torch', m)]:.2f}" for m in ["loader_eval", "loader_train"]))
PY
