//! 2-D convolution on the CPU as im2col + one matmul, forward and backward.
//!
//! candle's CPU `conv2d` forward is already im2col + matmul, but its backward is not: the input
//! gradient is a direct `conv_transpose2d` loop (one `vec_dot` per output pixel and channel) and
//! the weight gradient a conv2d with the batch as channels and the whole image as kernel. In the
//! C8 G-CNN of Table 1 (128 channels, 5×5 filters) those two were half of a training step. Here a
//! conv is `W (O, C·k·k) · cols (C·k·k, B·H'·W')` with `cols = im2col(x)`, so candle's autograd
//! takes both gradients as single large matmuls (`Wᵀ · g` and `g · colsᵀ`) and the input
//! gradient's scatter back to the image is [`Col2im`], im2col's adjoint. (candle's backward
//! detaches gradients, so col2im needs no backward of its own.)

use super::driver::{by_dtype, par_zeros, slice};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Where the filter taps of one conv read the input: `(C, H, W)` planes, `kh × kw` taps, zero
/// padding `pad`, stride `stride`.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    stride: usize,
}

impl Geometry {
    fn out_hw(&self) -> (usize, usize) {
        let o = |n: usize, k: usize| (n + 2 * self.pad - k) / self.stride + 1;
        (o(self.h, self.kh), o(self.w, self.kw))
    }

    /// Output pixels per image.
    fn l(&self) -> usize {
        let (oh, ow) = self.out_hw();
        oh * ow
    }

    /// Input coordinate read by output coordinate `o` through tap `t`, if inside the image.
    fn src(&self, o: usize, t: usize, n: usize) -> Option<usize> {
        (o * self.stride + t).checked_sub(self.pad).filter(|&i| i < n)
    }
}

/// `x: (B, C, H, W)` → `cols: (C·kh·kw, B·H'·W')`, row `(c, i, j)` holding, for every output
/// pixel, the input value under tap `(i, j)` of channel `c` (0 in the padding).
struct Im2col(Geometry);

fn im2col<T: WithDType>(g: Geometry, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(xs, xl, "im2col")?;
    let (oh, ow) = g.out_hw();
    let (plane, l) = (g.h * g.w, g.l());
    let b = x.len() / (g.c * plane);
    let mut out = par_zeros::<T>(g.c * g.kh * g.kw * b * l);
    out.par_chunks_mut(b * l).enumerate().for_each(|(row, dst)| {
        let (c, i, j) = (row / (g.kh * g.kw), row / g.kw % g.kh, row % g.kw);
        for n in 0..b {
            let src = &x[(n * g.c + c) * plane..][..plane];
            for oy in 0..oh {
                let Some(iy) = g.src(oy, i, g.h) else { continue };
                let d = &mut dst[n * l + oy * ow..][..ow];
                for (ox, v) in d.iter_mut().enumerate() {
                    if let Some(ix) = g.src(ox, j, g.w) {
                        *v = src[iy * g.w + ix];
                    }
                }
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from((g.c * g.kh * g.kw, b * l))))
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), im2col(self.0, xs, xl))
    }

    fn bwd(&self, _x: &Tensor, _cols: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1(Col2im(self.0))?))
    }
}

/// The adjoint of [`Im2col`]: `cols: (C·kh·kw, B·H'·W')` → `(B, C, H, W)`, each entry added back
/// to the input pixel it was read from.
struct Col2im(Geometry);

fn col2im<T: WithDType>(g: Geometry, cs: &CpuStorage, cl: &Layout) -> Result<(CpuStorage, Shape)> {
    let cols = slice::<T>(cs, cl, "col2im")?;
    let (oh, ow) = g.out_hw();
    let (plane, l) = (g.h * g.w, g.l());
    let b = cols.len() / (g.c * g.kh * g.kw * l);
    let mut out = par_zeros::<T>(b * g.c * plane);
    // One task per (image, channel) plane: every plane is written by its own taps only.
    out.par_chunks_mut(plane).enumerate().for_each(|(p, dst)| {
        let (n, c) = (p / g.c, p % g.c);
        for i in 0..g.kh {
            for j in 0..g.kw {
                let src = &cols[((c * g.kh + i) * g.kw + j) * b * l + n * l..][..l];
                for oy in 0..oh {
                    let Some(iy) = g.src(oy, i, g.h) else { continue };
                    for ox in 0..ow {
                        if let Some(ix) = g.src(ox, j, g.w) {
                            dst[iy * g.w + ix] += src[oy * ow + ox];
                        }
                    }
                }
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from((b, g.c, g.h, g.w))))
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, cs: &CpuStorage, cl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(cs, self.name(), col2im(self.0, cs, cl))
    }
}

/// Cross-correlation of `x: (B, C, H, W)` with `w: (O, C, kh, kw)`, zero padding `pad` and
/// stride `stride` (candle's `conv2d` with dilation 1 and one group), as im2col + matmul. CPU
/// only, f32 / f64: [`super::conv::conv2d_op`] picks it where it applies.
pub fn conv2d(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, wc, kh, kw) = w.dims4()?;
    if wc != c || stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
        bail!(
            "conv2d: input {:?}, weight {:?}, padding {pad}, stride {stride} do not fit",
            x.dims(),
            w.dims()
        );
    }
    let g = Geometry {
        c,
        h,
        w: wd,
        kh,
        kw,
        pad,
        stride,
    };
    let (oh, ow) = g.out_hw();
    let cols = x.contiguous()?.apply_op1(Im2col(g))?;
    let y = w.reshape((o, c * kh * kw))?.matmul(&cols)?;
    y.reshape((o, b, oh, ow))?.transpose(0, 1)?.contiguous()
}
