//! The machine: the device a config names ([`select_device`]), and process-wide settings that the
//! CPU training loop depends on for speed; binaries call [`tune_process`] once at start-up (the
//! CLI and `bench`), before any thread exists.
//!
//! Allocator: a ViT training step allocates and frees hundreds of activation-sized buffers
//! (0.1–30 MB each, every candle op returns a fresh `Vec`). With glibc's defaults the freed top of
//! the heap is trimmed back to the kernel and blocks above the mmap threshold are unmapped on
//! free, so every step faults its activations in again, page by zeroed page: on the small ViT
//! (batch 128) that was a quarter of the process's CPU time (11.6 s of sys time in a 36 s
//! benchmark run, against 2.5 s with the settings below; `perf` showed `clear_page_erms` and
//! page-fault handling at ~20% of samples). Keeping freed memory in the heap costs no peak memory
//! (the peak is reached anyway); the resident set just does not shrink between steps.
//!
//! Threads: candle runs its elementwise ops on its own "barrier pool", whose workers spin 25 000
//! times (about 0.6 ms here) after every op before they park, while our fused kernels and gemm
//! run on rayon's pool. On a 2-core machine the spinning worker holds the core that the next
//! rayon task needs: `perf` showed a quarter of a tiny-ViT step's samples in idle workers.
//! [`CANDLE_SPIN_LIMIT`] spins lets the core go within ~25 µs.

use candle_core::Device;

/// A `device` value that names no usable device.
#[derive(Debug, thiserror::Error)]
#[error("device {name:?}: {message}")]
pub struct DeviceError {
    pub name: String,
    pub message: String,
}

/// `device = "auto" | "cpu" | "cuda" | "cuda:N"`; `auto` is CUDA 0 when built with the `cuda`
/// feature and a GPU is present, else the CPU.
pub fn select_device(name: &str) -> Result<Device, DeviceError> {
    let cuda = |i: usize| {
        Device::new_cuda(i).map_err(|e| DeviceError {
            name: name.into(),
            message: format!("{e} (build with `--features cuda` on a machine with CUDA, or set device = \"cpu\")"),
        })
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" if candle_core::utils::cuda_is_available() => cuda(0),
        "auto" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(i) => cuda(i),
            None => Err(DeviceError {
                name: name.into(),
                message: "expected auto, cpu, cuda or cuda:N".into(),
            }),
        },
    }
}

/// Spins of an idle candle barrier-pool worker before it parks, unless the user sets
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` (candle's default: 25 000). On the 2-core development
/// machine, limits of 50–2000 all cut the tiny ViT's training step from 65–69 ms to 45–53 ms.
pub const CANDLE_SPIN_LIMIT: u32 = 1000;

/// Apply [`tune_allocator`] and the candle spin limit; call first thing in `main`.
pub fn tune_process() {
    tune_allocator();
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Before any thread exists (candle reads it when its pool starts, at the first op).
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT.to_string());
    }
}

/// Largest block glibc serves from the heap: its hard limit for `M_MMAP_THRESHOLD` on 64-bit
/// (`HEAP_MAX_SIZE / 2`); larger blocks are still mapped and unmapped per allocation.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Never trim the heap top back to the kernel (glibc's own default is 128 KiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = libc::c_int::MAX;

/// Keep freed activation buffers in the process for reuse (glibc only; a no-op elsewhere).
/// Returns whether the settings were applied. Left alone when the environment sets glibc's own
/// thresholds (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES`): e.g.
/// `scripts/bench.sh` maps every large buffer on its own to measure live memory, not the heap's.
pub fn tune_allocator() -> bool {
    let set_by_user = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if set_by_user {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters (under glibc's arena lock) and
        // validates them, returning 0 when it refuses one.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A fresh temporary name beside `path` for write-then-rename: `.<name>.tmp<pid>-<n><ext>`,
/// unique per process and per call, so two threads (tests, or parallel cache builds) writing the
/// same file never share a temporary. `ext` keeps an extension that a writer needs to see
/// (`".png"` for the bitmap encoder); usually `""`.
pub fn temp_sibling(path: &std::path::Path, ext: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}-{n}{ext}", std::process::id()))
}
