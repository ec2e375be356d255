//! The exact (erf) GELU x·Φ(x): fused forward, backward, derivative and second derivative
//! kernels, the inference tangent kernel, and the composed forms.

use super::driver::*;
use super::fastmath::Real;
use super::tangent::tangent_mul;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

/// Exact GELU x·Φ(x), elementwise, with the exact derivative. Off the fused path, candle's own
/// `gelu_erf` (a CUDA kernel too): one graph node that keeps only x; its backward's 1/√(2π) is
/// rounded to 0.398942, which limits gradient agreement to ~2e-7 relative.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return super::lean::gelu(x);
    }
    x.contiguous()?.apply_op1(GeluOp)
}

/// `g·gelu'(x)`, GELU's backward, on operands that track no gradient: one fused pass on the CPU,
/// composed elsewhere.
pub(super) fn gelu_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return g * gelu_erf_derivative_composed(x)?;
    }
    x.contiguous()?.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)
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
