//! The fully connected layer `y = x·Wᵀ + b` as one CPU op with its own backward.
//!
//! From candle ops a linear layer is reshape → matmul with a transposed view → broadcast add →
//! reshape: four autograd nodes. candle's backward adds every node's gradient into a fresh zero
//! tensor (a memset and an add over the activation each), candle's matmul zero-fills its output
//! before overwriting it, and the bias gradient is a strided `sum_keepdim` over the rows; under
//! perf, the reduce, the adds and the memsets were ~15% of a one-thread small-ViT step. Here the
//! forward writes the bias into each block of output rows and gemm accumulates x·Wᵀ onto it; the
//! backward is `dx = g·W`, `dW = gᵀ·x` and a vectorised column sum for `db`. All three products
//! run on `driver::matmul_par` (row blocks per thread), which scales to two cores better than
//! gemm's own threading.
//!
//! Other devices and dtypes take [`linear_composed`], which is also the tests' oracle.

use super::driver::{
    by_dtype, fusable, inference_only, matmul, matmul_par, par_row_sums, slice, sum_partials, written_by, Terms,
};
use super::fastmath::Real;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use gemm::Parallelism;
use rayon::prelude::*;

/// `x (…, in) · W (out, in)ᵀ [+ b (out)]`.
struct LinearOp;

fn linear_fwd<T: Real>(
    (xs, xl): (&CpuStorage, &Layout),
    (ws, wl): (&CpuStorage, &Layout),
    terms: Terms<T>,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (slice::<T>(xs, xl, "linear")?, slice::<T>(ws, wl, "linear")?);
    let (out_dim, in_dim) = wl.shape().dims2()?;
    // The product of the leading dims (not x.len() / in: in may be 0).
    let rows: usize = xl.dims()[..xl.dims().len() - 1].iter().product();
    let n = rows * out_dim;
    // y = x·Wᵀ [+ b] [+ residual]. SAFETY: y is (rows × out) row-major, x (rows × in) row-major,
    // Wᵀ is W read with row step 1 and column step `in`; all three are exactly the buffers'
    // extents and y aliases neither. matmul_par writes every element of y (the bias rows, or gemm
    // without accumulation).
    let y = unsafe {
        written_by(n, |y| {
            matmul_par(
                (rows, out_dim, in_dim),
                (y, out_dim, 1),
                (x.as_ptr(), in_dim, 1),
                (w.as_ptr(), 1, in_dim),
                T::from_f64(1.0),
                terms,
            )
        })
    };
    let mut dims = xl.dims().to_vec();
    *dims.last_mut().expect("linear: rank ≥ 1 checked by the wrapper") = out_dim;
    Ok((T::to_cpu_storage_owned(y), Shape::from(dims)))
}

fn linear_bias_fwd<T: Real>(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    (bs, bl): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let bias = Some(slice::<T>(bs, bl, "linear")?);
    linear_fwd(x, w, Terms { bias, residual: None })
}

fn linear_add_fwd<T: Real>(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    (rs, rl): (&CpuStorage, &Layout),
    bias: Option<&Tensor>,
) -> Result<(CpuStorage, Shape)> {
    let bias = bias.map(|b| b.to_vec1::<T>()).transpose()?;
    let residual = Some(slice::<T>(rs, rl, "linear_add")?);
    linear_fwd(
        x,
        w,
        Terms {
            bias: bias.as_deref(),
            residual,
        },
    )
}

/// `(dx, dW)` for `g = dL/dy`: `g·W` and `gᵀ·x` with the leading dims flattened into rows
/// (`g` made contiguous, `(rows, out)`, returned too for the bias gradient).
fn input_and_weight_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let out_dim = w.dim(0)?;
    let g2 = g.contiguous()?.reshape((g.elem_count() / out_dim.max(1), out_dim))?;
    let dx = g2.apply_op2_no_bwd(w, &LinearGrad::Input)?.reshape(x.shape())?;
    let dw = g2.apply_op2_no_bwd(x, &LinearGrad::Weight)?;
    Ok((dx, dw, g2))
}

/// `(dx, dW, db)` of `x·Wᵀ + b` by the fused gradient kernels.
fn fused_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (dx, dw, g2) = input_and_weight_grads(x, w, g)?;
    Ok((dx, dw, g2.apply_op1_no_bwd(&ColumnSums)?))
}

/// The two gradient products of [`LinearOp`], on [`matmul_par`]: `(g (rows, out), W)` → `g·W`
/// and `(g, x (…, in))` → `gᵀ·x (out, in)`. Not differentiable: candle's backward detaches them.
enum LinearGrad {
    Input,
    Weight,
}

fn linear_grad<T: Real>(
    which: &LinearGrad,
    (gs, gl): (&CpuStorage, &Layout),
    (os, ol): (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let (g, other) = (slice::<T>(gs, gl, "linear grad")?, slice::<T>(os, ol, "linear grad")?);
    let (rows, out_dim) = gl.shape().dims2()?;
    let in_dim = *ol.dims().last().expect("linear grad: rank ≥ 1");
    let one = T::from_f64(1.0);
    match which {
        LinearGrad::Input => {
            // SAFETY: g is (rows × out) and W (out × in) row-major; dx is a fresh buffer of
            // exactly the product's extent, which gemm (no `accumulate`) writes whole.
            let dx = unsafe {
                written_by(rows * in_dim, |dx| {
                    matmul_par(
                        (rows, in_dim, out_dim),
                        (dx, in_dim, 1),
                        (g.as_ptr(), out_dim, 1),
                        (other.as_ptr(), in_dim, 1),
                        one,
                        Terms::NONE,
                    )
                })
            };
            Ok((T::to_cpu_storage_owned(dx), Shape::from((rows, in_dim))))
        }
        LinearGrad::Weight => {
            // dW sums over the rows (the long axis): split it, one partial gᵀ·x per thread on
            // its rows, then add the partials. Row blocks of dW instead would each pack all of
            // x again.
            let threads = rayon::current_num_threads();
            let block = rows.div_ceil(threads).max(1);
            let partial = |i: usize| {
                let (r0, k) = (i * block, block.min(rows - i * block));
                // SAFETY: rows [r0, r0 + k) of g (read transposed: row step 1, column step
                // `out`) and of x (row-major); dw is a fresh (out × in) buffer that gemm (no
                // `accumulate`) writes whole.
                unsafe {
                    written_by(out_dim * in_dim, |dw| {
                        matmul(
                            (out_dim, in_dim, k),
                            (dw, in_dim, 1),
                            (g.as_ptr().add(r0 * out_dim), 1, out_dim),
                            (other.as_ptr().add(r0 * in_dim), in_dim, 1),
                            one,
                            false,
                            Parallelism::None,
                        )
                    })
                }
            };
            let partials: Vec<Vec<T>> = (0..rows.div_ceil(block)).into_par_iter().map(partial).collect();
            let dw = sum_partials(partials, out_dim * in_dim);
            Ok((T::to_cpu_storage_owned(dw), Shape::from((out_dim, in_dim))))
        }
    }
}

impl CustomOp2 for LinearGrad {
    fn name(&self) -> &'static str {
        "fused-linear-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, os: &CpuStorage, ol: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(gs, "linear grad", linear_grad(self, (gs, gl), (os, ol)))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, "linear", linear_fwd((xs, xl), (ws, wl), Terms::NONE))
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
        by_dtype!(xs, "linear", linear_bias_fwd((xs, xl), (ws, wl), (bs, bl)))
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

/// `residual + x·Wᵀ [+ b]` with operands `(x, W, residual)`, for [`linear_add`]'s no-gradient
/// path (no backward; the bias rides along as a field).
struct LinearAddOp {
    bias: Option<Tensor>,
}

impl CustomOp3 for LinearAddOp {
    fn name(&self) -> &'static str {
        "fused-linear-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(
            xs,
            self.name(),
            linear_add_fwd((xs, xl), (ws, wl), (rs, rl), self.bias.as_ref())
        )
    }
}

/// `y = x·Wᵀ [+ b]` on the last axis: `x: (…, in)`, `weight: (out, in)` (PyTorch layout),
/// `bias: (out)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    check(x, weight, bias)?;
    if !fusable(x) {
        return super::lean::linear(x, weight, bias, linear_composed);
    }
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp),
        None => x.apply_op2(&w, LinearOp),
    }
}

/// `linear(x, weight, bias) + residual`: a linear layer that feeds a residual stream. Where
/// nothing tracks a gradient on the CPU (evaluation, the LEE's JVP), one op adds the residual to
/// each block of output rows right after its gemm, equal to the bit to the two separate ops but
/// without a second pass over the stream (two per transformer block). In training (with a
/// bias), one graph node over `(x, [W | b], residual)` (`lean::linear_residual`), which does not
/// keep the linear's output for the add's backward.
pub fn linear_add(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
    check(x, weight, bias)?;
    match training_residual(x, weight, bias, residual)? {
        Some(b) => residual_node(x, (weight, b), residual, false),
        None => residual_add(x, weight, bias, residual),
    }
}

/// `linear(gelu(h), weight, bias) + residual`: a transformer MLP's second layer onto its residual
/// stream. In training (with a bias) one graph node over `(h, [W | b], residual)` whose backward
/// recomputes `gelu(h)`, so that the layer's input (4·D wide in a ViT, a third of a block's
/// activations) is not kept; PyTorch eager keeps both `h` and `gelu(h)`. Elsewhere equal to the bit
/// to [`gelu_erf`](super::gelu_erf) then [`linear_add`].
pub fn gelu_linear_add(h: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
    check(h, weight, bias)?;
    match training_residual(h, weight, bias, residual)? {
        Some(b) => residual_node(h, (weight, b), residual, true),
        None => residual_add(&super::gelu::gelu_erf(h)?, weight, bias, residual),
    }
}

/// The bias, where `x·Wᵀ + b + residual` is to be one training node: something tracks a gradient,
/// there is a bias (to pack with W) and the residual has the output's shape.
fn training_residual<'a>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&'a Tensor>,
    residual: &Tensor,
) -> Result<Option<&'a Tensor>> {
    let (fits, inference) = residual_fit(x, weight, bias, residual)?;
    Ok(bias.filter(|_| fits && !inference))
}

/// Whether the residual has the output's shape, and whether the op runs without a graph on the
/// CPU kernels ([`inference_only`]).
fn residual_fit(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<(bool, bool)> {
    let mut out = x.dims().to_vec();
    *out.last_mut().expect("rank ≥ 1: checked") = weight.dim(0)?;
    let others: Vec<&Tensor> = [weight, residual].into_iter().chain(bias).collect();
    Ok((residual.dims() == out, inference_only(x, &others)))
}

/// The training node of [`linear_add`] / [`gelu_linear_add`]: fused or portable.
fn residual_node(x: &Tensor, (w, b): (&Tensor, &Tensor), r: &Tensor, gelu_first: bool) -> Result<Tensor> {
    let act = |x: &Tensor| match gelu_first {
        true => super::gelu::gelu_erf(x),
        false => Ok(x.clone()),
    };
    match fusable(x) {
        true => super::lean::linear_residual(
            x,
            (w, b),
            r,
            gelu_first,
            |x, w, b, r| residual_add(&act(x)?, w, Some(b), r),
            fused_grads,
        ),
        false => super::lean::linear_residual(
            x,
            (w, b),
            r,
            gelu_first,
            |x, w, b, r| linear_composed(&act(x)?, w, Some(b))? + r,
            super::lean::Linear::grads,
        ),
    }
}

/// `linear(x, weight, bias) + residual` outside the training node: one op on the CPU where
/// nothing tracks a gradient and the shapes allow, else the two ops.
fn residual_add(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
    if residual_fit(x, weight, bias, residual)? != (true, true) {
        return linear(x, weight, bias)? + residual;
    }
    let (x, w, r) = (x.contiguous()?, weight.contiguous()?, residual.contiguous()?);
    x.apply_op3_no_bwd(&w, &r, &LinearAddOp { bias: bias.cloned() })
}

/// The shapes `linear` accepts: `x: (…, in)`, `weight: (out, in)`, `bias: (out)`.
fn check(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    let (out_dim, in_dim) = weight.dims2()?;
    if x.rank() == 0 || x.dim(D::Minus1)? != in_dim || bias.is_some_and(|b| b.dims() != [out_dim]) {
        bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit (x: (…, in), weight: (out, in), bias: (out))",
            x.dims(),
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    Ok(())
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
