//! Process-wide settings that the CPU training loop depends on for speed; binaries call
//! [`tune_allocator`] once at start-up (the CLI and `bench`).
//!
//! A ViT training step allocates and frees hundreds of activation-sized buffers (0.1–30 MB each,
//! every candle op returns a fresh `Vec`). With glibc's defaults the freed top of the heap is
//! trimmed back to the kernel and blocks above the mmap threshold are unmapped on free, so every
//! step faults its activations in again, page by zeroed page: on the small ViT (batch 128) that
//! was a quarter of the process's CPU time (11.6 s of sys time in a 36 s benchmark run, against
//! 2.5 s with the settings below; `perf` showed `clear_page_erms` and page-fault handling at
//! ~20% of samples). Keeping freed memory in the heap costs no peak memory (the peak is reached
//! anyway); the resident set just does not shrink between steps.

/// Largest block glibc serves from the heap: its hard limit for `M_MMAP_THRESHOLD` on 64-bit
/// (`HEAP_MAX_SIZE / 2`); larger blocks are still mapped and unmapped per allocation.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Never trim the heap top back to the kernel (glibc's own default is 128 KiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = libc::c_int::MAX;

/// Keep freed activation buffers in the process for reuse (glibc only; a no-op elsewhere).
/// Returns whether the settings were applied.
pub fn tune_allocator() -> bool {
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
