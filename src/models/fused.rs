//! Fused CPU kernels, with a backward, for the three row-wise ops that dominate a small ViT's
//! training step once the matmuls are fast: LayerNorm over the last axis, softmax over the last
//! axis and the exact (erf) GELU.
//!
//! Written from candle ops (as `layers.rs` must, because candle-nn's fused LayerNorm / softmax
//! have no backward), each of these is 4–8 elementwise/reduction kernels forward and 2–3× that
//! backward, each allocating a full-size temporary. Here each is one candle `CustomOp` whose
//! forward is one pass over the rows, split across the rayon pool, and whose `bwd` is a second
//! `CustomOp` of the same kind (timm / PyTorch compute the same formulas in their fused kernels).
//! The ops are exact rewrites: the tests (`tests/fused.rs`) hold them to the composed versions
//! and to f64 finite differences.
//!
//! The JVPs of LayerNorm and GELU (`*_jvp`, used by the LEE metric) have fused tangent kernels
//! without a backward; they run only when no operand tracks a gradient, and the composed,
//! differentiable JVP otherwise (LEE-penalised training differentiates it).
//!
//! On other devices or dtypes (CUDA, f16/bf16) the public functions fall back to the composed,
//! differentiable form, so callers never need to branch. Second derivatives through the fused
//! backward are not supported and fail loudly (`BackwardNotSupported`) rather than being cut.
//!
//! Also here, shared by `fused_attention`, `fused_linear` and `im2col`: the row-parallel driver
//! (`par_rows`), parallel output allocation (`par_zeros`, `written_by`) and gemm on raw strided
//! operands (`matmul`, `matmul_par`).

use crate::lie::tangent_mul;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType, D,
};
use gemm::Parallelism;
use rayon::prelude::*;

/// The float element types the kernels run on.
pub(super) trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    fn maximum(self, other: Self) -> Self;
}

macro_rules! real {
    ($t:ty, $erf:path, $exp:path) => {
        impl Real for $t {
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            fn maximum(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
// f64: libm (candle's own erf), so the fused GELU matches the composed `x·Φ(x)` bit for bit.
// f32: branch-free erf and exp ([`erf_f32`], [`exp_f32`]) so that the elementwise loops
// vectorise; libm's `erff` / `expf` are scalar calls, and the GELU kernels on them were 28% of a
// one-thread small-ViT training step under perf.
real!(f32, erf_f32, exp_f32);
real!(f64, candle_core::cpu::erf::erf_f64, f64::exp);

/// Horner's rule, lowest coefficient first (unrolled: the arrays are constants).
#[inline(always)]
fn horner<const N: usize>(c: &[f32; N], x: f32) -> f32 {
    c.iter().rev().fold(0.0, |acc, &k| acc.mul_add(x, k))
}

/// e^x in f32 within about 1 ulp, without a branch or a call (it vectorises): e^x = 2^n·e^r with
/// n = round(x·log₂e), r = x − n·ln 2 (ln 2 split in two, Cody–Waite) and e^r from Cephes'
/// `expf` polynomial. Below −87.33 (e^x subnormal) it returns 0; it is meant for x ≤ 88
/// (the kernels only take e^x of x ≤ 0); NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer n kept in the low mantissa bits: bits = 0x4B40_0000 + n.
    const SHIFT: f32 = 12_582_912.0;
    const EXP_R: [f32; 6] = [
        0.5,
        1.666_666_5e-1,
        4.166_579_6e-2,
        8.333_452e-3,
        1.398_2e-3,
        1.987_569_1e-4,
    ];
    let xc = x.clamp(-87.33, 88.0);
    let t = xc.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    // 0.693_359_4 is 0.693359375 = 710/1024 in f32 (exact n·C1), C1 + C2 = ln 2 to f32 precision.
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = horner(&EXP_R, r).mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits((t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23);
    if x < -87.33 {
        0.0
    } else {
        p * scale
    }
}

/// erf in f32 within 3 ulp (worst 3.1e-7 absolute), without a branch or a call so that its
/// loops vectorise: z·P(z²)/Q(z²) for |z| < 3.92, ±1 beyond (1 − erf(3.92) ≈ 9.6e-9 < ulp(1)/2).
/// P and Q (degree 5, all coefficients positive, so the sums never cancel) and the error bound
/// come from `scripts/erf_table.py`. A third of the work of the polynomial-plus-exp erf it
/// replaced (~1 ulp): that one was 8.5% of a small-ViT forward, GELU's share.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    // P's constant term is the fit's, one ulp below 2/√π (the slope of erf at 0).
    #[allow(clippy::approx_constant)]
    const ERF_P: [f32; 6] = [
        1.128379,
        0.19276358,
        0.053060096,
        0.0038682134,
        0.00028746075,
        2.0345321e-06,
    ];
    const ERF_Q: [f32; 6] = [1.0, 0.504164, 0.11508413, 0.0151720885, 0.001188057, 3.8067552e-05];
    let z = x.abs();
    let t = z * z;
    let y = z * horner(&ERF_P, t) / horner(&ERF_Q, t);
    // Not `min`/`clamp`: NaN must stay NaN.
    let y = if z < 3.92 || z.is_nan() { y } else { 1.0 };
    y.copysign(x)
}

/// Rows per rayon task: below this many elements a task is not worth its scheduling cost.
const MIN_TASK_ELEMS: usize = 16 * 1024;

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
fn map1<T: Real>(xs: &CpuStorage, xl: &Layout, op: &str, f: impl Fn(T) -> T + Sync) -> Result<(CpuStorage, Shape)> {
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
fn map2<T: Real>(
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
fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// Fill `out` row by row (rows of length `d`), in parallel over blocks of rows.
fn par_rows<T: Send>(out: &mut [T], d: usize, f: impl Fn(usize, &mut [T]) + Sync) {
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

/// Mean and 1/σ of one row (biased variance, as PyTorch), accumulated in the element type.
fn moments<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = lane_sum(x.len(), |i| x[i]) / n;
    let var = lane_sum(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, T::from_f64(1.0) / (var + eps).sqrt())
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

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// `y = (x − mean)/σ · weight + bias` over the last axis; `x: (..., D)`, `weight, bias: (D)`.
struct LayerNormOp {
    eps: f64,
}

fn ln_fwd<T: Real>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    bs: &CpuStorage,
    bl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w, b) = (
        slice::<T>(xs, xl, "layer_norm")?,
        slice::<T>(ws, wl, "layer_norm")?,
        slice::<T>(bs, bl, "layer_norm")?,
    );
    let d = last_dim(xl);
    let eps = T::from_f64(eps);
    let mut out = par_zeros(x.len());
    par_rows(&mut out, d, |r, y| {
        let xr = &x[r * d..(r + 1) * d];
        let (mean, rstd) = moments(xr, eps);
        for i in 0..d {
            y[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), ln_fwd(self.eps, xs, xl, ws, wl, bs, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3(w, &g, LayerNormGradInput { eps: self.eps })?;
        // (2, D): row 0 is d weight, row 1 is d bias.
        let dwb = x.apply_op2(&g, LayerNormGradParams { eps: self.eps })?;
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// d x = (ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)) / σ with ĝ = g ⊙ weight.
struct LayerNormGradInput {
    eps: f64,
}

fn ln_grad_x<T: Real>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w, g) = (
        slice::<T>(xs, xl, "layer_norm grad")?,
        slice::<T>(ws, wl, "layer_norm grad")?,
        slice::<T>(gs, gl, "layer_norm grad")?,
    );
    let d = last_dim(xl);
    let (eps, n) = (T::from_f64(eps), T::from_f64(d as f64));
    let mut out = par_zeros(x.len());
    par_rows(&mut out, d, |r, dx| {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let (mean, rstd) = moments(xr, eps);
        let sg = lane_sum(d, |i| gr[i] * w[i]);
        let sgx = lane_sum(d, |i| gr[i] * w[i] * (xr[i] - mean) * rstd);
        let (mg, mgx) = (sg / n, sgx / n);
        for i in 0..d {
            let xhat = (xr[i] - mean) * rstd;
            dx[i] = (gr[i] * w[i] - mg - xhat * mgx) * rstd;
        }
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp3 for LayerNormGradInput {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-input"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), ln_grad_x(self.eps, xs, xl, ws, wl, gs, gl))
    }
}

/// `(2, D)`: Σ_rows g ⊙ x̂ (weight gradient) and Σ_rows g (bias gradient).
struct LayerNormGradParams {
    eps: f64,
}

fn ln_grad_params<T: Real>(
    eps: f64,
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, g) = (
        slice::<T>(xs, xl, "layer_norm grad")?,
        slice::<T>(gs, gl, "layer_norm grad")?,
    );
    let d = last_dim(xl);
    let eps = T::from_f64(eps);
    let rows = x.len().checked_div(d).unwrap_or(0);
    let out = par_row_sums(rows, 2 * d, |r, acc: &mut [T]| {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
        let (mean, rstd) = moments(xr, eps);
        for i in 0..d {
            acc[i] += gr[i] * (xr[i] - mean) * rstd;
            acc[d + i] += gr[i];
        }
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from((2, d))))
}

impl CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad-params"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), ln_grad_params(self.eps, xs, xl, gs, gl))
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last axis, shifted by the row maximum.
struct SoftmaxOp;

/// Softmax of one row in place. Three separate passes (max, exp, sum) so that the exp pass
/// vectorises and the sum runs in [`lane_sum`]'s partial sums.
pub(super) fn softmax_row<T: Real>(row: &mut [T]) {
    let m = row.iter().fold(row[0], |a, &v| a.maximum(v));
    row.iter_mut().for_each(|v| *v = (*v - m).exp());
    let sum = lane_sum(row.len(), |i| row[i]);
    row.iter_mut().for_each(|v| *v /= sum);
}

/// In place, `d ← s ⊙ (d − Σ s ⊙ d)` for one row: the softmax's backward (d a cotangent) and
/// its JVP (d a tangent) alike, given the row's softmax `s`.
pub(super) fn softmax_row_grad<T: Real>(s: &[T], d: &mut [T]) {
    let dot = lane_sum(s.len(), |i| s[i] * d[i]);
    d.iter_mut().zip(s).for_each(|(d, &s)| *d = s * (*d - dot));
}

fn softmax_fwd<T: Real>(xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(xs, xl, "softmax")?;
    let d = last_dim(xl);
    let mut out = par_zeros(x.len());
    par_rows(&mut out, d, |r, s| {
        s.copy_from_slice(&x[r * d..(r + 1) * d]);
        softmax_row(s)
    });
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), softmax_fwd(xs, xl))
    }

    fn bwd(&self, _x: &Tensor, s: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(s.apply_op2(&g.contiguous()?, SoftmaxGrad)?))
    }
}

/// d x = s ⊙ (g − Σ s ⊙ g), from the forward's output `s`.
struct SoftmaxGrad;

fn softmax_grad<T: Real>(ss: &CpuStorage, sl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
    let (s, g) = (slice::<T>(ss, sl, "softmax grad")?, slice::<T>(gs, gl, "softmax grad")?);
    let d = last_dim(sl);
    let mut out = par_zeros(s.len());
    par_rows(&mut out, d, |r, dx| {
        dx.copy_from_slice(&g[r * d..(r + 1) * d]);
        softmax_row_grad(&s[r * d..(r + 1) * d], dx);
    });
    Ok((T::to_cpu_storage_owned(out), sl.shape().clone()))
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(&self, ss: &CpuStorage, sl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(ss, self.name(), softmax_grad(ss, sl, gs, gl))
    }
}

// ---------------------------------------------------------------------------------------------
// GELU (erf)

/// x·Φ(x), Φ(x) = (1 + erf(x/√2))/2.
struct GeluOp;

fn gelu_fwd<T: Real>(xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let (half, rsqrt2) = (T::from_f64(0.5), T::from_f64(std::f64::consts::FRAC_1_SQRT_2));
    map1(xs, xl, "gelu", |x: T| x * ((x * rsqrt2).erf() * half + half))
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_fwd(xs, xl))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2(&g.contiguous()?, GeluGrad)?))
    }
}

/// d x = g·(Φ(x) + x·φ(x)), φ(x) = exp(−x²/2)/√(2π): the exact derivative (candle's own
/// `gelu_erf` backward truncates 1/√(2π) to 0.398942).
struct GeluGrad;

/// φ(x) = exp(−x²/2)/√(2π).
#[inline(always)]
fn normal_pdf<T: Real>(x: T) -> T {
    (x * x * T::from_f64(-0.5)).exp()
        * T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2)
}

/// gelu'(x) = Φ(x) + x·φ(x).
#[inline(always)]
fn gelu_deriv<T: Real>(x: T) -> T {
    let half = T::from_f64(0.5);
    (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf() * half + half + x * normal_pdf(x)
}

fn gelu_grad<T: Real>(xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
    map2(xs, xl, gs, gl, "gelu grad", |x: T, g| g * gelu_deriv(x))
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_grad(xs, xl, gs, gl))
    }
}

/// gelu'(x) as a tensor, for the GELU JVP (dy = gelu'(x)·dx), which LEE-regularised training
/// differentiates once more: its backward is g·gelu''(x) = g·φ(x)·(2 − x²).
struct GeluDerivOp;

fn gelu_deriv_fwd<T: Real>(xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    map1(xs, xl, "gelu derivative", gelu_deriv::<T>)
}

impl CustomOp1 for GeluDerivOp {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-derivative"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_deriv_fwd(xs, xl))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2(&g.contiguous()?, GeluSecond)?))
    }
}

/// d x = g·φ(x)·(2 − x²).
struct GeluSecond;

fn gelu_second<T: Real>(xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
    map2(xs, xl, gs, gl, "gelu second", |x: T, g| {
        g * normal_pdf(x) * (T::from_f64(2.0) - x * x)
    })
}

impl CustomOp2 for GeluSecond {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-second"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), gelu_second(xs, xl, gs, gl))
    }
}

// ---------------------------------------------------------------------------------------------
// Tangents (JVP) for inference: no backward; the public `*_jvp` functions take them only when
// nothing needs a gradient and the composed, differentiable forms otherwise.

/// `(dx (T, …, D), x (…, D), weight (D))` → `dy (T, …, D)`, the LayerNorm tangent
/// `(dx − mean(dx) − x̂·mean(x̂ ⊙ dx))·weight/σ`, row by row (tangent row r is x's row r mod rows).
struct LayerNormTangent {
    eps: f64,
}

fn ln_tangent<T: Real>(
    eps: f64,
    (ts, tl): (&CpuStorage, &Layout),
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let name = "layer_norm jvp";
    let (dx, x, w) = (
        slice::<T>(ts, tl, name)?,
        slice::<T>(xs, xl, name)?,
        slice::<T>(ws, wl, name)?,
    );
    let d = last_dim(xl);
    let (eps, n, rows) = (T::from_f64(eps), T::from_f64(d as f64), x.len() / d.max(1));
    let mut out = par_zeros(dx.len());
    par_rows(&mut out, d, |r, dy| {
        let (xr, tr) = (&x[(r % rows) * d..][..d], &dx[r * d..][..d]);
        let (mean, rstd) = moments(xr, eps);
        let m1 = lane_sum(d, |i| tr[i]) / n;
        let m2 = lane_sum(d, |i| (xr[i] - mean) * rstd * tr[i]) / n;
        for i in 0..d {
            dy[i] = (tr[i] - m1 - (xr[i] - mean) * rstd * m2) * rstd * w[i];
        }
    });
    Ok((T::to_cpu_storage_owned(out), tl.shape().clone()))
}

impl CustomOp3 for LayerNormTangent {
    fn name(&self) -> &'static str {
        "fused-layer-norm-tangent"
    }

    fn cpu_fwd(
        &self,
        ts: &CpuStorage,
        tl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(ts, self.name(), ln_tangent(self.eps, (ts, tl), (xs, xl), (ws, wl)))
    }
}

/// `(dx (T, …), x (…))` → `gelu'(x)·dx`, each tangent against the same x.
struct GeluTangent;

fn gelu_tangent<T: Real>(ts: &CpuStorage, tl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let (dx, x) = (slice::<T>(ts, tl, "gelu jvp")?, slice::<T>(xs, xl, "gelu jvp")?);
    let mut out = par_zeros(dx.len());
    // Tangent by tangent, each against x, in parallel blocks.
    for (dy, t) in out.chunks_mut(x.len().max(1)).zip(dx.chunks(x.len().max(1))) {
        dy.par_chunks_mut(MIN_TASK_ELEMS)
            .zip(t.par_chunks(MIN_TASK_ELEMS).zip(x.par_chunks(MIN_TASK_ELEMS)))
            .for_each(|(dy, (t, x))| {
                dy.iter_mut()
                    .zip(t.iter().zip(x))
                    .for_each(|(y, (&t, &x))| *y = gelu_deriv(x) * t)
            });
    }
    Ok((T::to_cpu_storage_owned(out), tl.shape().clone()))
}

impl CustomOp2 for GeluTangent {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-tangent"
    }

    fn cpu_fwd(&self, ts: &CpuStorage, tl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(ts, self.name(), gelu_tangent(ts, tl, xs, xl))
    }
}

/// Whether the fused, backward-less tangent kernels may run: CPU f32/f64 and no operand that
/// carries an autograd graph.
pub(super) fn inference_only(x: &Tensor, others: &[&Tensor]) -> bool {
    fusable(x) && !x.track_op() && others.iter().all(|t| !t.track_op())
}

// ---------------------------------------------------------------------------------------------
// Public API

/// Whether the fused kernel can run on this tensor (CPU, f32 / f64).
pub(super) fn fusable(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// LayerNorm over the last axis with affine `weight, bias: (D)`: `x: (..., D)` → `(..., D)`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        bail!(
            "layer_norm: weight {:?} and bias {:?} must both be ({d}) for input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        );
    }
    if !fusable(x) {
        return layer_norm_composed(x, weight, bias, eps);
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
}

/// LayerNorm and its JVP: `x: (…, D)`, `dx: (T, …, D)` → `(y, dy)`. Fused when nothing needs a
/// gradient, [`layer_norm_jvp_composed`] otherwise.
pub fn layer_norm_jvp(x: &Tensor, dx: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if dx.rank() != x.rank() + 1 || dx.dims()[1..] != *x.dims() {
        bail!(
            "layer_norm jvp: tangents {:?} do not fit x {:?} (expected (T, …x))",
            dx.dims(),
            x.dims()
        );
    }
    if !inference_only(x, &[dx, weight, bias]) {
        return layer_norm_jvp_composed(x, dx, weight, bias, eps);
    }
    let y = layer_norm(x, weight, bias, eps)?;
    let dy = dx
        .contiguous()?
        .apply_op3_no_bwd(&x.contiguous()?, &weight.contiguous()?, &LayerNormTangent { eps })?;
    Ok((y, dy))
}

/// The same JVP from differentiable candle ops: d x̂ = (dx − mean(dx) − x̂·mean(x̂ ⊙ dx))/σ,
/// then scaled by the weight.
pub fn layer_norm_jvp_composed(
    x: &Tensor,
    dx: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (xhat, rstd) = normalize_composed(x, eps)?;
    // The primal through the same (differentiable) kernel as the fused path: identical values.
    let y = layer_norm(x, weight, bias, eps)?;
    let dxc = dx.broadcast_sub(&dx.mean_keepdim(D::Minus1)?)?;
    let proj = tangent_mul(&dxc, &xhat)?.mean_keepdim(D::Minus1)?; // (T, ..., 1)
    let dxhat = tangent_mul(&(dxc - tangent_mul(&proj, &xhat)?)?, &rstd)?;
    Ok((y, dxhat.broadcast_mul(weight)?))
}

/// The same LayerNorm from differentiable candle ops (other devices and dtypes).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (xhat, _) = normalize_composed(x, eps)?;
    xhat.broadcast_mul(weight)?.broadcast_add(bias)
}

/// x̂ = (x − mean)/σ over the last axis and 1/σ (`(…, 1)`), from differentiable candle ops.
fn normalize_composed(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

/// Softmax over the last axis: `x: (..., N)` → `(..., N)`.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    x.dim(D::Minus1)?;
    if !fusable(x) {
        return softmax_composed(x);
    }
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// The same softmax from differentiable candle ops (the max shift is a constant: detached).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The softmax JVP: dS = S ⊙ (dA − Σ S ⊙ dA) over the last axis, given the primal output
/// `s: (..., N)` and tangents `da: (T, ..., N)`; differentiable candle ops.
pub fn softmax_tangent(s: &Tensor, da: &Tensor) -> Result<Tensor> {
    let sda = tangent_mul(da, s)?;
    let total = sda.sum_keepdim(D::Minus1)?; // (T, ..., 1)
    sda - tangent_mul(&total, s)?
}

/// Exact GELU x·Φ(x), elementwise, with the exact derivative.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return gelu_erf_composed(x);
    }
    x.contiguous()?.apply_op1(GeluOp)
}

/// gelu'(x) = Φ(x) + x·φ(x), elementwise, differentiable (the GELU JVP's factor).
pub fn gelu_erf_derivative(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return gelu_erf_derivative_composed(x);
    }
    x.contiguous()?.apply_op1(GeluDerivOp)
}

/// GELU and its JVP: `x: (…)`, `dx: (T, …)` → `(gelu(x), gelu'(x)·dx)`. Fused when nothing
/// needs a gradient; otherwise from [`gelu_erf_derivative`], which LEE-penalised training
/// differentiates once more.
pub fn gelu_erf_jvp(x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
    if dx.rank() != x.rank() + 1 || dx.dims()[1..] != *x.dims() {
        bail!(
            "gelu jvp: tangents {:?} do not fit x {:?} (expected (T, …x))",
            dx.dims(),
            x.dims()
        );
    }
    let y = gelu_erf(x)?;
    if !inference_only(x, &[dx]) {
        return Ok((y, tangent_mul(dx, &gelu_erf_derivative(x)?)?));
    }
    let dy = dx.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &GeluTangent)?;
    Ok((y, dy))
}

/// The same derivative from differentiable candle ops.
pub fn gelu_erf_derivative_composed(x: &Tensor) -> Result<Tensor> {
    let cdf = (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
    cdf + (x * pdf)?
}

/// The same GELU from differentiable candle ops (candle's `erf` has an exact backward).
pub fn gelu_erf_composed(x: &Tensor) -> Result<Tensor> {
    x * (x * std::f64::consts::FRAC_1_SQRT_2)?.erf()?.affine(0.5, 0.5)?
}

#[cfg(test)]
mod tests {
    use super::{erf_f32, exp_f32};

    /// |a − b| in units of f32's ulp at b (the f64 reference).
    fn ulps(a: f32, b: f64) -> f64 {
        (f64::from(a) - b).abs() / (b.abs().max(f64::from(f32::MIN_POSITIVE)) * f64::from(f32::EPSILON))
    }

    #[test]
    fn exp_f32_is_within_an_ulp_of_f64_exp() {
        // Every 2⁻¹⁰ on [−87.33, 88], against libm's f64 exp; 0 below (e^x subnormal), NaN kept.
        let mut worst = 0.0f64;
        for k in (-87.33f64 * 1024.0) as i64..=88 * 1024 {
            let x = k as f32 / 1024.0;
            worst = worst.max(ulps(exp_f32(x), f64::from(x).exp()));
        }
        assert!(worst <= 1.0, "exp_f32: {worst:.2} ulp");
        assert_eq!(exp_f32(-87.34), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn erf_f32_is_within_its_bound_of_f64_erf() {
        // Every 2⁻¹⁴ on [−6, 6] (the rational piece, the switch to ±1 at 3.92): the bound
        // scripts/erf_table.py prints (3.09e-7) plus a little for the ulp of the last operations;
        // odd symmetry exact; ±1 at ±∞; NaN kept.
        let mut worst = 0.0f64;
        for k in -6 * 16384..=6 * 16384 {
            let x = k as f32 / 16384.0;
            let e = (f64::from(erf_f32(x)) - candle_core::cpu::erf::erf_f64(f64::from(x))).abs();
            worst = worst.max(e);
            assert_eq!(erf_f32(-x), -erf_f32(x));
        }
        assert!(worst < 3.2e-7, "erf_f32: worst |error| {worst:.3e}");
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
    }
}
