//! The fully connected layer `y = x·Wᵀ + b` as one CPU op with its own backward.
//!
//! From candle ops a linear layer is reshape → matmul with a transposed view → broadcast add →
//! reshape: four autograd nodes. candle's backward adds every node's gradient into a fresh zero
//! tensor (a memset and an add over the activation each), candle's matmul zero-fills its output
//! before overwriting it, and the bias gradient is a strided `sum_keepdim` over the rows; under
//! perf, the reduce, the adds and the memsets were ~15% of a one-thread small-ViT step. Here the
//! forward writes the bias into the output rows and gemm accumulates x·Wᵀ onto them; the backward
//! is `dx = g·W`, `dW = gᵀ·x` (candle matmuls) and a vectorised column sum for `db`.
//!
//! Other devices and dtypes take [`linear_composed`], which is also the tests' oracle.

use crate::models::fused::{by_dtype, fusable, matmul, par_row_sums, slice, Real};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use gemm::Parallelism;

/// `x (…, in) · W (out, in)ᵀ [+ b (out)]`.
struct LinearOp;

fn linear_fwd<T: Real>(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (slice::<T>(xs, xl, "linear")?, slice::<T>(ws, wl, "linear")?);
    let (out_dim, in_dim) = wl.shape().dims2()?;
    let rows = x.len() / in_dim;
    let (mut y, accumulate) = match bias {
        Some((bs, bl)) => (slice::<T>(bs, bl, "linear")?.repeat(rows), true),
        None => (vec![T::from_f64(0.0); rows * out_dim], false),
    };
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: y is (rows × out) row-major, x (rows × in) row-major, Wᵀ is W read with row step 1
    // and column step `in`; all three are exactly the buffers' extents and y aliases neither.
    unsafe {
        matmul(
            (rows, out_dim, in_dim),
            (y.as_mut_ptr(), out_dim, 1),
            (x.as_ptr(), in_dim, 1),
            (w.as_ptr(), 1, in_dim),
            T::from_f64(1.0),
            accumulate,
            par,
        );
    }
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("linear: rank ≥ 1 checked by the wrapper") = out_dim;
    Ok((T::to_cpu_storage_owned(y), Shape::from(dims)))
}

/// `(dx, dW)` for `g = dL/dy`: `g·W` and `gᵀ·x` with the leading dims flattened into rows.
fn input_and_weight_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (out_dim, in_dim) = w.dims2()?;
    let rows = x.elem_count() / in_dim;
    let g2 = g.contiguous()?.reshape((rows, out_dim))?;
    let dx = g2.matmul(w)?.reshape(x.shape())?;
    let dw = g2.t()?.matmul(&x.reshape((rows, in_dim))?)?;
    Ok((dx, dw, g2))
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, "linear", linear_fwd((xs, xl), (ws, wl), None))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = input_and_weight_grads(x, w, g)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear-bias"
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
        by_dtype!(xs, "linear", linear_fwd((xs, xl), (ws, wl), Some((bs, bl))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, g2) = input_and_weight_grads(x, w, g)?;
        Ok((Some(dx), Some(dw), Some(g2.apply_op1_no_bwd(&ColumnSums)?)))
    }
}

/// `(rows, d)` → `(d)`: the sum of the rows (the bias gradient).
struct ColumnSums;

fn column_sums<T: Real>(gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(gs, gl, "column sums")?;
    let d = gl.dims()[1];
    let sums = par_row_sums(g.len() / d.max(1), d, |r, acc: &mut [T]| {
        acc.iter_mut().zip(&g[r * d..(r + 1) * d]).for_each(|(a, &v)| *a += v);
    });
    Ok((T::to_cpu_storage_owned(sums), Shape::from(d)))
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(gs, self.name(), column_sums(gs, gl))
    }
}

/// `y = x·Wᵀ [+ b]` on the last axis: `x: (…, in)`, `weight: (out, in)` (PyTorch layout),
/// `bias: (out)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_dim, in_dim) = weight.dims2()?;
    if x.dim(D::Minus1)? != in_dim || bias.is_some_and(|b| b.dims() != [out_dim]) {
        bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit (x: (…, in), weight: (out, in), bias: (out))",
            x.dims(),
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    if !fusable(x) {
        return linear_composed(x, weight, bias);
    }
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp),
        None => x.apply_op2(&w, LinearOp),
    }
}

/// The same layer from differentiable candle ops.
pub fn linear_composed(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let in_dim = x.dim(D::Minus1)?;
    let y = x.reshape((x.elem_count() / in_dim, in_dim))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1: x.dim(D::Minus1) succeeded") = weight.dim(0)?;
    y.reshape(dims)
}
