# Sourced by the scripts that run on a lent GPU machine (gpu_check.sh, gpu_table1.sh), from the
# repo root: unpacks the binaries scripts/build_cuda.sh packed, if they are not unpacked yet, and
# points the dynamic loader at the CUDA 13 libraries there (cuBLAS / cuRAND / NVRTC / cudart: the
# toolkit's, else PyTorch's wheels, nvidia/cu13/lib; libcuda.so.1 from the driver).
BIN=${BIN:-dist-cuda}
if [[ ! -x $BIN/liederiv && -f .gpu-carry/dist-cuda.tar.xz ]]; then
    tar xJf .gpu-carry/dist-cuda.tar.xz
fi
libs=$(
    ls -d /usr/local/nvidia/lib64 /usr/local/cuda/lib64 2>/dev/null
    python3 -c 'import site, glob; [print(d) for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib")]' 2>/dev/null
)
export LD_LIBRARY_PATH=$(echo "$libs" | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LIEDERIV_DATA_DIR=${LIEDERIV_DATA_DIR:-$PWD/.gpu-data}
