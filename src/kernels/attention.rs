//! Fused CPU scaled-dot-product attention over timm's packed `qkv` projection, with a backward.
//!
//! Composed from candle ops (see [`attention_composed`]), the attention core is a strided split
//! of `qkv` into q, k, v (three copies), a scale pass, two batched matmuls, the softmax and a
//! transposing merge of the heads (another copy); backward adds the matching transposes, the
//! zero-padded scatter of each narrow and their sums. Worse, candle runs a batched matmul as one
//! gemm per (batch·head) in a serial loop, and gemm does not thread a 50×50×64 product, so on 2
//! cores one sat idle: on the small ViT (B=128, N=50, D=192, 3 heads) forward + backward of the
//! core took ~190 ms of CPU per block out of a ~4.5 s training step.
//!
//! Here one task per (batch, head), spread over the rayon pool, reads its q, k, v straight out
//! of `qkv` (gemm takes the strides), keeps the N×N scores in a task-local buffer and writes its
//! output columns straight into the merged `(B, N, D)` result. Backward recomputes the scores
//! (as flash attention does; they are cheap next to storing `B·H·N²` floats) and writes dq, dk,
//! dv into their columns of one `(B, N, 3D)` gradient. The JVP used by the LEE metric
//! ([`attention_jvp`]) is one more such pass, per task the output and its tangents, when nothing
//! needs a gradient. `tests/fused.rs` holds all three to the composed forms and the backward to
//! f64 finite differences.

use super::driver::{by_dtype, fusable, matmul, slice, written_by, SharedMut};
use super::fastmath::Real;
use super::softmax::{softmax, softmax_row, softmax_row_grad, softmax_tangent};
use super::tangent::{merge_tangent, split_tangent, tangent_matmul};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Geometry of one call: `qkv: (B, N, 3D)` with D = heads · hd.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    n: usize,
    heads: usize,
    hd: usize,
}

impl Dims {
    fn of(l: &Layout, heads: usize) -> Result<Self> {
        let (b, n, d3) = l.shape().dims3()?;
        if heads == 0 || !d3.is_multiple_of(3 * heads) {
            bail!("attention: qkv width {d3} is not 3 × a multiple of {heads} heads");
        }
        Ok(Self {
            b,
            n,
            heads,
            hd: d3 / 3 / heads,
        })
    }

    fn d(&self) -> usize {
        self.heads * self.hd
    }
}

/// Scores of one (batch, head) into `s (N×N)`: softmax(scale · q·kᵀ) row by row.
///
/// # Safety
/// `q`, `k` point at the head's first row in `qkv` (row stride 3D).
unsafe fn scores<T: Real>(dm: Dims, scale: T, q: *const T, k: *const T, s: &mut [T]) {
    let (n, hd, ld) = (dm.n, dm.hd, 3 * dm.d());
    // kᵀ as a (hd × N) operand: row step 1, column step 3D.
    matmul(
        (n, n, hd),
        (s.as_mut_ptr(), n, 1),
        (q, ld, 1),
        (k, 1, ld),
        scale,
        false,
        Parallelism::None,
    );
    s.chunks_mut(n).for_each(softmax_row);
}

/// softmax(scale · q·kᵀ)·v per head, heads merged: `qkv (B, N, 3D)` → `(B, N, D)`.
struct AttentionOp {
    heads: usize,
    scale: f64,
}

fn attn_fwd<T: Real>(heads: usize, scale: f64, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let qkv = slice::<T>(xs, xl, "attention")?;
    let dm = Dims::of(xl, heads)?;
    let (n, hd, d) = (dm.n, dm.hd, dm.d());
    let scale = T::from_f64(scale);
    let fill = |ptr: *mut T| {
        let dst = SharedMut(ptr);
        (0..dm.b * heads).into_par_iter().for_each_init(
            || vec![T::from_f64(0.0); n * n],
            |s, task| {
                let (b, h) = (task / heads, task % heads);
                let base = qkv[b * n * 3 * d..].as_ptr();
                // SAFETY: q, k, v of head h are columns [h·hd, (h+1)·hd) of the q / k / v thirds of
                // batch b's rows, in bounds of `qkv`; this task alone writes columns [h·hd, (h+1)·hd)
                // of batch b's rows of `out`.
                unsafe {
                    let (q, k, v) = (base.add(h * hd), base.add(d + h * hd), base.add(2 * d + h * hd));
                    scores(dm, scale, q, k, s);
                    let o = dst.get().add(b * n * d + h * hd);
                    matmul(
                        (n, hd, n),
                        (o, d, 1),
                        (s.as_ptr(), n, 1),
                        (v, 3 * d, 1),
                        T::from_f64(1.0),
                        false,
                        Parallelism::None,
                    );
                }
            },
        );
    };
    // SAFETY: every (batch, head) task writes its hd columns of batch b's rows: all of `out`.
    let out = unsafe { written_by::<T>(dm.b * n * d, fill) };
    Ok((T::to_cpu_storage_owned(out), Shape::from((dm.b, n, d))))
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), attn_fwd(self.heads, self.scale, xs, xl))
    }

    fn bwd(&self, qkv: &Tensor, _o: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = AttentionGrad {
            heads: self.heads,
            scale: self.scale,
        };
        Ok(Some(qkv.apply_op2(&g.contiguous()?, op)?))
    }
}

/// d qkv from the output gradient `g (B, N, D)`: with S = softmax(A), A = scale·q·kᵀ, O = S·v:
/// dv = Sᵀ·g, dS = g·vᵀ, dA = S ⊙ (dS − rowsum(S ⊙ dS)), dq = scale·dA·k, dk = scale·dAᵀ·q.
struct AttentionGrad {
    heads: usize,
    scale: f64,
}

fn attn_grad<T: Real>(
    heads: usize,
    scale: f64,
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (qkv, g) = (
        slice::<T>(xs, xl, "attention grad")?,
        slice::<T>(gs, gl, "attention grad")?,
    );
    let dm = Dims::of(xl, heads)?;
    let (n, hd, d) = (dm.n, dm.hd, dm.d());
    if g.len() != dm.b * n * d {
        bail!(
            "attention grad: gradient {:?} does not match qkv {:?}",
            gl.dims(),
            xl.dims()
        );
    }
    let (scale, one) = (T::from_f64(scale), T::from_f64(1.0));
    let fill = |ptr: *mut T| {
        let dst = SharedMut(ptr);
        (0..dm.b * heads).into_par_iter().for_each_init(
            || (vec![T::from_f64(0.0); n * n], vec![T::from_f64(0.0); n * n]),
            |(s, ds), task| {
                let (b, h) = (task / heads, task % heads);
                let base = qkv[b * n * 3 * d..].as_ptr();
                let go = g[b * n * d + h * hd..].as_ptr();
                // SAFETY: reads as in `attn_fwd`; this task alone writes columns h·hd.. of the q, k
                // and v thirds of batch b's rows of `out`.
                unsafe {
                    let (q, k, v) = (base.add(h * hd), base.add(d + h * hd), base.add(2 * d + h * hd));
                    let dbase = dst.get().add(b * n * 3 * d);
                    let (dq, dk, dv) = (dbase.add(h * hd), dbase.add(d + h * hd), dbase.add(2 * d + h * hd));
                    scores(dm, scale, q, k, s);
                    // dv = Sᵀ·g: Sᵀ is S read with row step 1, column step N.
                    matmul(
                        (n, hd, n),
                        (dv, 3 * d, 1),
                        (s.as_ptr(), 1, n),
                        (go, d, 1),
                        one,
                        false,
                        Parallelism::None,
                    );
                    // dS = g·vᵀ
                    matmul(
                        (n, n, hd),
                        (ds.as_mut_ptr(), n, 1),
                        (go, d, 1),
                        (v, 1, 3 * d),
                        one,
                        false,
                        Parallelism::None,
                    );
                    s.chunks(n)
                        .zip(ds.chunks_mut(n))
                        .for_each(|(sr, dr)| softmax_row_grad(sr, dr));
                    matmul(
                        (n, hd, n),
                        (dq, 3 * d, 1),
                        (ds.as_ptr(), n, 1),
                        (k, 3 * d, 1),
                        scale,
                        false,
                        Parallelism::None,
                    );
                    matmul(
                        (n, hd, n),
                        (dk, 3 * d, 1),
                        (ds.as_ptr(), 1, n),
                        (q, 3 * d, 1),
                        scale,
                        false,
                        Parallelism::None,
                    );
                }
            },
        );
    };
    // SAFETY: the tasks write dq, dk and dv of every (batch, head), i.e. all 3D columns of every row.
    let out = unsafe { written_by::<T>(qkv.len(), fill) };
    Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "fused-attention-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), attn_grad(self.heads, self.scale, xs, xl, gs, gl))
    }
}

/// The JVP of the attention core along `T` tangents of `qkv`, for inference (no backward):
/// `(qkv (B, N, 3D), dqkv (T, B, N, 3D))` → `(1 + T, B, N, D)`, the output then its tangents.
/// Per (batch, head) task, with S = softmax(A), A = scale·q·kᵀ:
/// dA = scale·(dq·kᵀ + q·dkᵀ), dS = S ⊙ (dA − rowsum(S ⊙ dA)), dO = dS·v + S·dv.
struct AttentionJvpOp {
    heads: usize,
    scale: f64,
}

fn attn_jvp<T: Real>(
    heads: usize,
    scale: f64,
    (xs, xl): (&CpuStorage, &Layout),
    (ts, tl): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let dm = Dims::of(xl, heads)?;
    let (qkv, dqkv) = (
        slice::<T>(xs, xl, "attention jvp")?,
        slice::<T>(ts, tl, "attention jvp")?,
    );
    let (n, d, hd) = (dm.n, dm.d(), dm.hd);
    let tangents = dqkv.len() / qkv.len().max(1);
    if tl.dims().len() != 4 || tl.dims()[1..] != *xl.dims() {
        bail!(
            "attention jvp: tangents {:?} do not fit qkv {:?} (expected (T, B, N, 3D))",
            tl.dims(),
            xl.dims()
        );
    }
    let (scale, one) = (T::from_f64(scale), T::from_f64(1.0));
    let fill = |ptr: *mut T| {
        let dst = SharedMut(ptr);
        let per_slab = dm.b * n * d; // one (B, N, D) slab of the output
        (0..dm.b * heads).into_par_iter().for_each_init(
            || (vec![T::from_f64(0.0); n * n], vec![T::from_f64(0.0); n * n]),
            |(s, ds), task| {
                let (b, h) = (task / heads, task % heads);
                let col = |base: *const T, part: usize| base.wrapping_add(b * n * 3 * d + part * d + h * hd);
                let (q, k, v) = (col(qkv.as_ptr(), 0), col(qkv.as_ptr(), 1), col(qkv.as_ptr(), 2));
                let ld = 3 * d;
                // SAFETY: reads as in `attn_fwd` (and the same offsets in each tangent's slab of
                // dqkv); this task alone writes columns [h·hd, (h+1)·hd) of batch b's rows in every
                // (B, N, D) slab of `out`.
                unsafe {
                    scores(dm, scale, q, k, s);
                    let o = |slab: usize| dst.get().add(slab * per_slab + b * n * d + h * hd);
                    matmul(
                        (n, hd, n),
                        (o(0), d, 1),
                        (s.as_ptr(), n, 1),
                        (v, ld, 1),
                        one,
                        false,
                        Parallelism::None,
                    );
                    for t in 0..tangents {
                        let tb = dqkv.as_ptr().add(t * qkv.len());
                        let (dq, dk, dv) = (col(tb, 0), col(tb, 1), col(tb, 2));
                        let da = ds.as_mut_ptr();
                        matmul(
                            (n, n, hd),
                            (da, n, 1),
                            (dq, ld, 1),
                            (k, 1, ld),
                            scale,
                            false,
                            Parallelism::None,
                        );
                        matmul(
                            (n, n, hd),
                            (da, n, 1),
                            (q, ld, 1),
                            (dk, 1, ld),
                            scale,
                            true,
                            Parallelism::None,
                        );
                        s.chunks(n)
                            .zip(ds.chunks_mut(n))
                            .for_each(|(sr, dr)| softmax_row_grad(sr, dr));
                        let d_o = o(1 + t);
                        matmul(
                            (n, hd, n),
                            (d_o, d, 1),
                            (ds.as_ptr(), n, 1),
                            (v, ld, 1),
                            one,
                            false,
                            Parallelism::None,
                        );
                        matmul(
                            (n, hd, n),
                            (d_o, d, 1),
                            (s.as_ptr(), n, 1),
                            (dv, ld, 1),
                            one,
                            true,
                            Parallelism::None,
                        );
                    }
                }
            },
        );
    };
    // SAFETY: every (batch, head) task writes its columns of batch b's rows in the output slab and in
    // each tangent's slab.
    let out = unsafe { written_by::<T>((1 + tangents) * dm.b * n * d, fill) };
    Ok((T::to_cpu_storage_owned(out), Shape::from((1 + tangents, dm.b, n, d))))
}

impl CustomOp2 for AttentionJvpOp {
    fn name(&self) -> &'static str {
        "fused-attention-jvp"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), attn_jvp(self.heads, self.scale, (xs, xl), (ts, tl)))
    }
}

/// `qkv: (B, N, 3D)` → q (scaled), k, v, each `(B·H, N, D/H)`: timm's packing, (3, H, hd) on the
/// last axis.
pub fn split_heads(qkv: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, d3) = qkv.dims3()?;
    let hd = d3 / 3 / heads;
    // (B, N, 3D) -> (B, N, 3, H, hd) -> (3, B, H, N, hd)
    let qkv = qkv.reshape((b, n, 3, heads, hd))?.permute((2, 0, 3, 1, 4))?;
    let part = |i: usize| qkv.get(i)?.reshape((b * heads, n, hd));
    Ok(((part(0)? * scale)?, part(1)?, part(2)?))
}

/// `(B·H, N, hd)` → `(B, N, D)`.
pub fn merge_heads(o: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, n, hd) = o.dims3()?;
    // (B·H, N, hd) -> (B, H, N, hd) -> (B, N, H, hd) -> (B, N, D)
    o.reshape((bh / heads, heads, n, hd))?
        .transpose(1, 2)?
        .reshape((bh / heads, n, heads * hd))
}

/// Multi-head attention core softmax(scale·q·kᵀ)·v on timm's packed projection:
/// `qkv: (B, N, 3D)` → `(B, N, D)` with the heads merged. Fused on CPU (f32 / f64), composed
/// elsewhere.
pub fn attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (_, _, d3) = qkv.dims3()?;
    if heads == 0 || !d3.is_multiple_of(3 * heads) {
        bail!("attention: qkv width {d3} is not 3 × a multiple of {heads} heads");
    }
    if !fusable(qkv) {
        return super::lean::attention(qkv, heads, scale);
    }
    qkv.contiguous()?.apply_op1(AttentionOp { heads, scale })
}

/// The attention core and its JVP: `qkv: (B, N, 3D)`, `dqkv: (T, B, N, 3D)` → the output
/// `(B, N, D)` and its tangents `(T, B, N, D)`. When nothing needs a gradient (evaluation, the
/// LEE metric) this is one fused CPU pass; when the JVP itself is differentiated (LEE-penalised
/// training) or off the CPU it is [`attention_jvp_composed`].
pub fn attention_jvp(qkv: &Tensor, dqkv: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, Tensor)> {
    let (_, _, d3) = qkv.dims3()?;
    if heads == 0 || !d3.is_multiple_of(3 * heads) {
        bail!("attention: qkv width {d3} is not 3 × a multiple of {heads} heads");
    }
    if !fusable(qkv) || qkv.track_op() || dqkv.track_op() {
        return attention_jvp_composed(qkv, dqkv, heads, scale);
    }
    let both = qkv
        .contiguous()?
        .apply_op2_no_bwd(&dqkv.contiguous()?, &AttentionJvpOp { heads, scale })?;
    let t = both.dim(0)? - 1;
    Ok((both.get(0)?, both.narrow(0, 1, t)?))
}

/// The same JVP from differentiable candle ops: the product rule through A = q·kᵀ,
/// S = softmax(A) and O = S·V.
pub fn attention_jvp_composed(qkv: &Tensor, dqkv: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, Tensor)> {
    let (q, k, v) = split_heads(qkv, heads, scale)?;
    // (T, B, N, 3D) -> (T·B, N, 3D) -> 3 × (T·B·H, N, hd) -> (T, B·H, N, hd)
    let (dqkv, t) = merge_tangent(dqkv)?;
    let (dq, dk, dv) = split_heads(&dqkv, heads, scale)?;
    let (dq, dk, dv) = (split_tangent(&dq, t)?, split_tangent(&dk, t)?, split_tangent(&dv, t)?);

    let s = softmax(&q.matmul(&k.t()?)?)?; // (B·H, N, N)
                                           // dA = dq·kᵀ + q·dkᵀ, with q·dkᵀ = (dk·qᵀ)ᵀ
    let da = (tangent_matmul(&dq, &k.t()?)? + tangent_matmul(&dk, &q.t()?)?.transpose(2, 3)?)?;
    let ds = softmax_tangent(&s, &da)?;
    // dO = dS·V + S·dV, with S·dV = (dVᵀ·Sᵀ)ᵀ
    let s_dv = tangent_matmul(&dv.transpose(2, 3)?, &s.t()?)?.transpose(2, 3)?;
    let d_o = (tangent_matmul(&ds, &v)? + s_dv)?; // (T, B·H, N, hd)

    // The primal through the same (differentiable) kernel as the fused path: identical values.
    let o = attention(qkv, heads, scale)?;
    // (T, B·H, N, hd) -> (T·B·H, N, hd) -> (T·B, N, D) -> (T, B, N, D)
    let (d_o, _) = merge_tangent(&d_o)?;
    Ok((o, split_tangent(&merge_heads(&d_o, heads)?, t)?))
}

/// The same attention from differentiable candle ops.
pub fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (q, k, v) = split_heads(qkv, heads, scale)?;
    let s = softmax(&q.matmul(&k.t()?)?)?; // (B·H, N, N)
    merge_heads(&s.matmul(&v)?, heads)
}
