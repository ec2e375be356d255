//! LayerNorm over the last axis: the fused forward, its two gradient kernels, the inference
//! tangent kernel, and the composed (differentiable candle ops) forms the public functions fall
//! back to on other devices and dtypes or when the JVP itself is differentiated.

use super::driver::*;
use super::fastmath::Real;
use super::tangent::tangent_mul;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Mean and 1/σ of one row (biased variance, as PyTorch), accumulated in the element type.
fn moments<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = lane_sum(x.len(), |i| x[i]) / n;
    let var = lane_sum(x.len(), |i| (x[i] - mean) * (x[i] - mean)) / n;
    (mean, T::from_f64(1.0) / (var + eps).sqrt())
}

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
        // (2, D): row 0 is d weight, row 1 is d bias. Outside a differentiated backward
        // (candle's CANDLE_GRAD_DO_NOT_DETACH) no node: a recorded one would keep `g`, an
        // activation-sized gradient, alive in the weight's gradient until the optimiser step.
        let op = LayerNormGradParams { eps: self.eps };
        let dwb = match backward_is_differentiated() {
            true => x.apply_op2(&g, op)?,
            false => x.apply_op2_no_bwd(&g, &op)?,
        };
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
        return super::lean::layer_norm(x, weight, bias, eps);
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
