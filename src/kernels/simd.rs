//! The instruction set of the matmuls: gemm (candle's CPU matmul, which our kernels call too) is
//! built with its AVX-512 micro-kernels (`x86-v4`) beside the AVX2 + FMA ones and picks one set
//! at run time, so one binary serves both kinds of CPU. Our own row kernels are compiled for the
//! AVX2 + FMA baseline every build targets (`.cargo/config.toml`: x86-64-v3).
//!
//! `LIEDERIV_AVX512=0` forces gemm's AVX2 kernels on an AVX-512 machine (the switch is read in
//! `vendor/gemm-common`; vendor/README.md), so both paths can be run and compared on one machine.

use std::sync::OnceLock;

/// Whether gemm runs its AVX-512 kernels: the CPU has AVX-512 F (what gemm tests; BW, DQ and VL
/// come with it on every AVX-512 CPU since Skylake-SP) and `LIEDERIV_AVX512` is not `0`.
pub fn avx512() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f") && !gemm_common::avx512_disabled()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The instruction set gemm uses here, for logs and benchmarks.
pub fn isa() -> &'static str {
    if avx512() {
        "avx512"
    } else {
        "avx2"
    }
}
