//! The drivers every kernel shares: the row-parallel loop over the rayon pool (`par_rows`,
//! `map1`, `map2`), parallel output allocation (`par_zeros`, `written_by`), row sums in
//! interleaved partials, gemm on raw strided operands (`matmul`, `matmul_par`), the dtype
//! dispatch (`by_dtype!`) and the test of whether a fused kernel may run (`fusable`,
//! `inference_only`).

use super::fastmath::Real;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Rows per rayon task: below this many elements a task is not worth its scheduling cost.
pub(super) const MIN_TASK_ELEMS: usize = 16 * 1024;

/// The contiguous data of one operand (the public wrappers make operands contiguous).
pub(super) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: operand with shape {:?} is not contiguous", l.dims()),
    }
}

/// `n` zeros, written by the whole rayon pool: a serial `vec![0; n]` memset over a 20 MB
/// activation left the second core idle for ~5% of a small-ViT forward.
pub(super) fn par_zeros<T: WithDType>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut().par_chunks_mut(MIN_TASK_ELEMS).for_each(|c| {
        c.iter_mut().for_each(|d| {
            d.write(T::zero());
        })
    });
    // SAFETY: every element of the spare capacity (≥ n of them) was written above.
    unsafe { v.set_len(n) };
    v
}

/// A fresh buffer of `n` elements that `fill` writes completely through the raw pointer it is
/// given (the gemm products and the per-head attention kernels), so that it is not zero-filled
/// first only to be overwritten.
///
/// # Safety
/// `fill` must write every one of the `n` elements (and may not read them).
pub(super) unsafe fn written_by<T>(n: usize, fill: impl FnOnce(*mut T)) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(v.as_mut_ptr());
    // SAFETY: the caller's contract: all n elements are initialised by `fill`.
    unsafe { v.set_len(n) };
    v
}

/// An elementwise kernel `f(x)` over one contiguous operand, in parallel blocks of
/// `MIN_TASK_ELEMS` (each block a plain loop over slices, which the compiler can vectorise),
/// written straight into the fresh output (no zero fill first: a pass over 20 MB for GELU).
pub(super) fn map1<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    op: &str,
    f: impl Fn(T) -> T + Sync,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(xs, xl, op)?;
    let mut out = Vec::with_capacity(x.len());
    out.spare_capacity_mut()
        .par_chunks_mut(MIN_TASK_ELEMS)
        .zip(x.par_chunks(MIN_TASK_ELEMS))
        .for_each(|(y, x)| {
            y.iter_mut().zip(x).for_each(|(y, &x)| {
                y.write(f(x));
            })
        });
    // SAFETY: the chunks of x cover all x.len() elements, and each wrote its own span of the
    // spare capacity (≥ x.len(), chunked from the same start with the same size).
    unsafe { out.set_len(x.len()) };
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

/// [`map1`] for kernels `f(x, g)` of an operand and an incoming gradient of the same shape.
pub(super) fn map2<T: Real>(
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
    op: &str,
    f: impl Fn(T, T) -> T + Sync,
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (slice::<T>(xs, xl, op)?, slice::<T>(gs, gl, op)?);
    if x.len() != g.len() {
        bail!("{op}: operand of {} elements, gradient of {}", x.len(), g.len());
    }
    let mut out = Vec::with_capacity(x.len());
    out.spare_capacity_mut()
        .par_chunks_mut(MIN_TASK_ELEMS)
        .zip(x.par_chunks(MIN_TASK_ELEMS).zip(g.par_chunks(MIN_TASK_ELEMS)))
        .for_each(|(y, (x, g))| {
            y.iter_mut().zip(x).zip(g).for_each(|((y, &x), &g)| {
                y.write(f(x, g));
            })
        });
    // SAFETY: as in map1 (x and g have the same length, checked above).
    unsafe { out.set_len(x.len()) };
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

/// Size of the last axis of a layout (rank ≥ 1 is checked by the wrappers).
pub(super) fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// Fill `out` row by row (rows of length `d`), in parallel over blocks of rows.
pub(super) fn par_rows<T: Send>(out: &mut [T], d: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if d == 0 {
        return;
    }
    let rows_per_task = (MIN_TASK_ELEMS / d).max(1);
    let run = |(task, block): (usize, &mut [T])| {
        for (j, row) in block.chunks_mut(d).enumerate() {
            f(task * rows_per_task + j, row);
        }
    };
    if out.len() <= MIN_TASK_ELEMS {
        out.chunks_mut(d * rows_per_task).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(d * rows_per_task).enumerate().for_each(run);
    }
}

/// Σ f(i) for i in 0..n, in eight interleaved partial sums. A single running sum is one chain of
/// n dependent adds (4 cycles each, never vectorised: float addition does not reassociate); eight
/// independent chains fill one SIMD register. Aimed at the LayerNorm row statistics: with one
/// running sum they were 26% of a one-thread small-ViT training step under perf.
#[inline(always)]
pub(super) fn lane_sum<T: Real>(n: usize, f: impl Fn(usize) -> T) -> T {
    const LANES: usize = 8;
    let zero = T::from_f64(0.0);
    let mut acc = [zero; LANES];
    let full = n - n % LANES;
    for base in (0..full).step_by(LANES) {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += f(base + k);
        }
    }
    let tail = (full..n).fold(zero, |a, i| a + f(i));
    let [a0, a1, a2, a3, a4, a5, a6, a7] = acc;
    ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)) + tail
}

/// Σ over `rows` of a per-row contribution of width `width`: `add(r, acc)` adds row r's into
/// `acc`. Partial sums per block of rows (in parallel), then a serial reduction of the partials.
pub(super) fn par_row_sums<T: Real>(rows: usize, width: usize, add: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let rows_per_task = (MIN_TASK_ELEMS / width.max(1)).max(1);
    let partial = |task: usize| {
        let mut acc = vec![zero; width];
        for r in task * rows_per_task..((task + 1) * rows_per_task).min(rows) {
            add(r, &mut acc);
        }
        acc
    };
    let tasks = rows.div_ceil(rows_per_task);
    let partials: Vec<Vec<T>> = if rows * width <= MIN_TASK_ELEMS {
        (0..tasks).map(partial).collect()
    } else {
        (0..tasks).into_par_iter().map(partial).collect()
    };
    sum_partials(partials, width)
}

/// The element-wise sum of per-task partial results of length `width` (zeros if there are none),
/// added into the first one.
pub(super) fn sum_partials<T: Real>(partials: Vec<Vec<T>>, width: usize) -> Vec<T> {
    let mut partials = partials.into_iter();
    let mut out = partials.next().unwrap_or_else(|| vec![T::from_f64(0.0); width]);
    for p in partials {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
    }
    out
}

/// `dst (m×n) = [dst +] beta · lhs (m×k) · rhs (k×n)` (`accumulate` keeps what `dst` holds),
/// every operand given by pointer and (row, column) strides in elements: the gemm crate (candle's
/// own CPU matmul) called directly, for kernels that own their output buffer.
///
/// # Safety
/// The pointers must cover the strided extents and `dst` must not alias `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: T,
    accumulate: bool,
    par: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        T::from_f64(if accumulate { 1.0 } else { 0.0 }),
        beta,
        false,
        false,
        false,
        par,
    )
}

/// A raw pointer that tasks share: only read, or written at a disjoint set of elements per task.
#[derive(Clone, Copy)]
pub(super) struct SharedMut<T>(pub(super) *mut T);
// SAFETY: only used by tasks that read, or write disjoint elements (see each use).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Through a method, so that closures capture the whole (Sync) wrapper, not the raw field.
    pub(super) fn get(&self) -> *mut T {
        self.0
    }
}

/// What [`matmul_par`] adds to the product, block by block while the block's rows are in cache
/// (a separate pass over the whole output cost ~5% of a small-ViT forward): a `bias` row written
/// into the rows before gemm accumulates onto them, and `residual` rows added after. The result
/// is the same to the bit as the product, plus the bias, plus the residual in separate passes.
#[derive(Clone, Copy)]
pub(super) struct Terms<'a, T> {
    /// One row of `n`, added to every row first.
    pub bias: Option<&'a [T]>,
    /// `(m, n)` row-major, added last (a residual stream).
    pub residual: Option<&'a [T]>,
}

impl<T> Terms<'_, T> {
    pub(super) const NONE: Self = Terms {
        bias: None,
        residual: None,
    };
}

/// `dst = beta·lhs·rhs [+ bias] [+ residual]` on the whole rayon pool: blocks of `dst` rows (and
/// the matching `lhs` rows), one single-threaded gemm each. Each block packs its own copy of
/// `rhs`, which is cheap next to the product; in exchange the two cores never wait on each other
/// inside a gemm. gemm's own `Parallelism::Rayon(2)` reached ~90 GFLOP/s on the small ViT's
/// shapes where one thread alone reaches ~65 (and MKL, inside PyTorch's forward, ~120). Without
/// a bias, gemm overwrites `dst` and never reads it.
///
/// # Safety
/// As [`matmul`]; with any of the `terms`, `dst` rows are contiguous (`dst.2 == 1`).
pub(super) unsafe fn matmul_par<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: T,
    terms: Terms<T>,
) {
    assert!(
        ((terms.bias.is_none() && terms.residual.is_none()) || dst.2 == 1)
            && terms.bias.is_none_or(|b| b.len() == n)
            && terms.residual.is_none_or(|r| r.len() == m * n),
        "matmul_par: terms do not fit a contiguous ({m}, {n}) dst"
    );
    // A few blocks per thread, so that a core slowed by other load hands work to the other;
    // whole multiples of gemm's 16-row micro-tile.
    let blocks = 4 * rayon::current_num_threads();
    let rows = m.div_ceil(blocks).next_multiple_of(16).max(16);
    let (d, l, r) = (
        SharedMut(dst.0),
        SharedMut(lhs.0.cast_mut()),
        SharedMut(rhs.0.cast_mut()),
    );
    let block = |i: usize| {
        let (r0, mm) = (i * rows, rows.min(m - i * rows));
        // SAFETY: block i writes dst rows [r0, r0 + mm) only (n contiguous elements from each
        // row start when there are terms, asserted above); lhs and rhs are only read.
        unsafe {
            let out = d.get().add(r0 * dst.1);
            if let Some(b) = terms.bias {
                for row in 0..mm {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), out.add(row * dst.1), n);
                }
            }
            matmul(
                (mm, n, k),
                (out, dst.1, dst.2),
                (l.get().add(r0 * lhs.1).cast_const(), lhs.1, lhs.2),
                (r.get().cast_const(), rhs.1, rhs.2),
                beta,
                terms.bias.is_some(),
                Parallelism::None,
            );
            if let Some(res) = terms.residual {
                for row in 0..mm {
                    // The row is initialised: gemm wrote it.
                    let y = std::slice::from_raw_parts_mut(out.add(row * dst.1), n);
                    let at = (r0 + row) * n;
                    y.iter_mut().zip(&res[at..at + n]).for_each(|(y, &v)| *y += v);
                }
            }
        }
    };
    if rows >= m {
        block(0)
    } else {
        (0..m.div_ceil(rows)).into_par_iter().for_each(block)
    }
}

/// Dispatch a kernel on the dtype of its first operand.
macro_rules! by_dtype {
    ($s:expr, $op:expr, $kernel:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => $kernel::<f32>($($arg),*),
            CpuStorage::F64(_) => $kernel::<f64>($($arg),*),
            _ => bail!("{}: only f32 and f64 are supported by the fused CPU kernel", $op),
        }
    };
}
pub(super) use by_dtype;

/// Whether the fused, backward-less tangent kernels may run: CPU f32/f64 and no operand that
/// carries an autograd graph.
pub(super) fn inference_only(x: &Tensor, others: &[&Tensor]) -> bool {
    fusable(x) && !x.track_op() && others.iter().all(|t| !t.track_op())
}

/// Whether candle records the ops of backward passes (`CANDLE_GRAD_DO_NOT_DETACH` set, as candle
/// reads it): only then may a backward's own ops need a backward.
pub(super) fn backward_is_differentiated() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CANDLE_GRAD_DO_NOT_DETACH").is_ok_and(|s| !s.is_empty() && s != "0"))
}

/// Set by [`set_portable`]: run the composed forms on the CPU too.
static PORTABLE: AtomicBool = AtomicBool::new(false);

/// Make every op take the portable, composed form that other devices and dtypes run (CUDA,
/// f16 / bf16) on the CPU as well (`runtime.kernels = "portable"`): candle's autograd graph is
/// the same on every device, so the GPU path's memory and ops can be measured here. Process-wide.
pub fn set_portable(on: bool) {
    PORTABLE.store(on, Ordering::Relaxed);
}

/// Whether the fused kernel can run on this tensor (CPU, f32 / f64, not [`set_portable`]).
pub fn fusable(x: &Tensor) -> bool {
    !PORTABLE.load(Ordering::Relaxed)
        && matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), DType::F32 | DType::F64)
}
