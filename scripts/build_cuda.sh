#!/usr/bin/env bash
# Build liederiv with candle's CUDA backend on a machine without a CUDA install (issue 9).
#
#   scripts/build_cuda.sh                 # bins + the CUDA test binary, for an H100 (sm_90)
#   CUDA_COMPUTE_CAP=80 scripts/build_cuda.sh
#
# The toolkit comes from NVIDIA's CUDA 13.0 wheels on PyPI (nvcc, nvvm, headers, cccl, cudart,
# cuBLAS, cuRAND, NVRTC), unpacked once into $LIEDERIV_CUDA_HOME (default ~/.cache/liederiv/cuda13).
# candle links the CUDA libraries dynamically; the driver library libcuda.so.1 only exists where a
# GPU driver is installed, so we link against a stub that exports the driver API's symbols (taken
# from cudarc's bindings) and the real one is loaded at run time. cudarc is pinned to the CUDA
# major/minor of the GPU machine with CUDARC_CUDA_VERSION (13.0: driver 580 and PyTorch's cu130
# libraries there).
#
# Output: dist-cuda/ with liederiv, bench and the CUDA test binary (tests/cuda.rs), and the same
# packed as .gpu-carry/dist-cuda.tar.xz to carry to the GPU machine; scripts/gpu_check.sh unpacks
# and runs them there. On a machine with a normal CUDA
# toolkit (nvcc on PATH, libcuda present) none of this is needed:
#   CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION_PY=${CUDA_VERSION_PY:-13.0}   # the wheels' CUDA release
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
T=${LIEDERIV_CUDA_HOME:-$HOME/.cache/liederiv/cuda13}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
PY=${PYTHON:-python3}

if [[ ! -x "$T/nvidia/cu13/bin/nvcc" ]]; then
    echo "build_cuda: fetching the CUDA $CUDA_VERSION_PY wheels into $T (once)" >&2
    mkdir -p "$T/whl"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$T/whl" \
        "nvidia-cuda-nvcc==$CUDA_VERSION_PY.*" "nvidia-nvvm==$CUDA_VERSION_PY.*" \
        "nvidia-cuda-crt==$CUDA_VERSION_PY.*" "nvidia-cuda-cccl==$CUDA_VERSION_PY.*" \
        "nvidia-cuda-runtime==$CUDA_VERSION_PY.*" "nvidia-cuda-nvrtc==$CUDA_VERSION_PY.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
    for w in "$T"/whl/*.whl; do unzip -q -o "$w" -d "$T"; done
fi
C=$T/nvidia/cu13

# Link directory: unversioned names for the linker, and the driver stub.
L=$T/link
mkdir -p "$L"
for lib in cudart cublas cublasLt nvrtc; do ln -sf "$C/lib/lib$lib.so.13" "$L/lib$lib.so"; done
ln -sf "$C/lib/libcurand.so.10" "$L/libcurand.so"
if [[ ! -f "$L/libcuda.so" ]]; then
    cargo fetch --locked -q
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | tail -1)
    grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' |
        sort -u >"$L/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$L/libcuda.so" "$L/cuda_stub.c"
fi

export PATH=$C/bin:$PATH CUDA_HOME=$C
export NVCC_PREPEND_FLAGS="-I$C/include -I$C/include/cccl"
export LIBRARY_PATH=$L${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
nvcc --version | tail -2

cargo build --release --locked --features cuda --bins
cargo test --release --locked --features cuda --test cuda --no-run

mkdir -p dist-cuda
cp "$CARGO_TARGET_DIR/release/liederiv" "$CARGO_TARGET_DIR/release/bench" dist-cuda/
test_bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/cuda-* | grep -v '\.d$' | head -1)
cp "$test_bin" dist-cuda/cuda_tests
strip dist-cuda/*
# ~190 MB stripped, mostly candle's PTX and quantized-kernel cubins repeated in each binary; one
# xz stream with a 64 MiB dictionary shares them: ~19 MB to carry.
mkdir -p .gpu-carry
tar cf - dist-cuda | xz -9 -T0 >.gpu-carry/dist-cuda.tar.xz
ls -la dist-cuda .gpu-carry
echo "build_cuda: done; carry .gpu-carry/ (and a data folder) to the GPU machine and run scripts/gpu_check.sh there"
