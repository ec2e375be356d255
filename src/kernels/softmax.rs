//! Softmax over the last axis: the fused forward, its backward, and the tangent (JVP) shared
//! with the attention kernels (`softmax_tangent`).

use super::driver::*;
use super::fastmath::Real;
use super::tangent::tangent_mul;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

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

/// Softmax over the last axis: `x: (..., N)` → `(..., N)`.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    x.dim(D::Minus1)?;
    if !fusable(x) {
        return super::lean::softmax(x);
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
