//! Depthwise 2-D convolution (one k×k filter per channel, stride 1, zero padding: ConvNeXt's 7×7)
//! on the CPU, with its backward.
//!
//! candle's grouped `conv2d` runs one convolution per group (`chunk` + `cat`), so a depthwise
//! conv over C channels is C convolutions and C graph nodes. Here it is one op: the forward
//! walks each (image, channel) plane once per tap, and the backward is two more such ops (the
//! input gradient, a correlation with the flipped taps, and the weight gradient, a per-channel
//! sum over images and pixels). Elsewhere (CUDA, f16 / bf16, `runtime.kernels = "portable"`)
//! [`depthwise_conv2d`] sums the k² shifted, per-channel-scaled copies of the padded input,
//! composed candle ops with their own backward.

use super::driver::{by_dtype, fusable, par_zeros, slice};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `(C, H, W)` planes, `k × k` taps, zero padding `pad`, stride 1.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
}

impl Geometry {
    fn out_hw(&self) -> (usize, usize) {
        (self.h + 2 * self.pad + 1 - self.k, self.w + 2 * self.pad + 1 - self.k)
    }

    /// The output range `[lo, hi)` along an axis of `n` inputs (and `o` outputs) whose tap `t`
    /// reads inside the input: input `o + t − pad` ∈ [0, n).
    fn valid(&self, t: usize, n: usize, o: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(t);
        let hi = (n + self.pad).saturating_sub(t).min(o);
        (lo, hi.max(lo))
    }
}

/// `y[b, c, oy, ox] = Σ_ij w[c, i, j] · x[b, c, oy + i − pad, ox + j − pad]`.
struct Depthwise(Geometry);

/// For every plane `p = (b, c)` of `dst` (output planes of `plane_out` elements), add
/// `w[c, i, j] · src` shifted by tap (i, j): `forward` reads `src` at input coordinates, the
/// input gradient (`!forward`) scatters the output gradient back to them.
fn taps<T: WithDType>(g: Geometry, src: &[T], w: &[T], forward: bool) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let (plane_in, plane_out) = (g.h * g.w, oh * ow);
    let (dst_plane, src_plane) = if forward {
        (plane_out, plane_in)
    } else {
        (plane_in, plane_out)
    };
    let planes = src.len() / src_plane;
    let mut out = par_zeros::<T>(planes * dst_plane);
    out.par_chunks_mut(dst_plane).enumerate().for_each(|(p, dst)| {
        let c = p % g.c;
        let s = &src[p * src_plane..][..src_plane];
        for i in 0..g.k {
            let (y0, y1) = g.valid(i, g.h, oh);
            for j in 0..g.k {
                let wv = w[(c * g.k + i) * g.k + j];
                let (x0, x1) = g.valid(j, g.w, ow);
                if x1 <= x0 {
                    continue;
                }
                // Output columns x0..x1 read input columns x0 + j − pad ..: one slice each way.
                let (ix0, len) = (x0 + j - g.pad, x1 - x0);
                for oy in y0..y1 {
                    let (o_row, i_row) = (oy * ow, (oy + i - g.pad) * g.w);
                    if forward {
                        let d = &mut dst[o_row + x0..][..len];
                        d.iter_mut()
                            .zip(&s[i_row + ix0..][..len])
                            .for_each(|(d, &v)| *d += wv * v);
                    } else {
                        let d = &mut dst[i_row + ix0..][..len];
                        d.iter_mut()
                            .zip(&s[o_row + x0..][..len])
                            .for_each(|(d, &v)| *d += wv * v);
                    }
                }
            }
        }
    });
    out
}

fn forward<T: WithDType>(
    g: Geometry,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, w) = (slice::<T>(xs, xl, "depthwise")?, slice::<T>(ws, wl, "depthwise")?);
    let (oh, ow) = g.out_hw();
    let b = x.len() / (g.c * g.h * g.w);
    Ok((
        T::to_cpu_storage_owned(taps(g, x, w, true)),
        Shape::from((b, g.c, oh, ow)),
    ))
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), forward(self.0, xs, xl, ws, wl))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = g.apply_op2_no_bwd(w, &InputGrad(self.0))?;
        let dw = x.apply_op2_no_bwd(&g, &WeightGrad(self.0))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The adjoint in x: `dx[b, c, iy, ix] = Σ_ij w[c, i, j] · g[b, c, iy − i + pad, ix − j + pad]`.
struct InputGrad(Geometry);

fn input_grad<T: WithDType>(
    g: Geometry,
    gs: &CpuStorage,
    gl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (grad, w) = (
        slice::<T>(gs, gl, "depthwise input grad")?,
        slice::<T>(ws, wl, "depthwise")?,
    );
    let (oh, ow) = g.out_hw();
    let b = grad.len() / (g.c * oh * ow);
    Ok((
        T::to_cpu_storage_owned(taps(g, grad, w, false)),
        Shape::from((b, g.c, g.h, g.w)),
    ))
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-input-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(gs, self.name(), input_grad(self.0, gs, gl, ws, wl))
    }
}

/// The adjoint in w: `dw[c, i, j] = Σ_{b, oy, ox} g[b, c, oy, ox] · x[b, c, oy + i − pad, ox + j − pad]`,
/// one task per channel (each owns its k² sums; images are added in order, so the sum is the
/// same on any number of threads).
struct WeightGrad(Geometry);

fn weight_grad<T: WithDType>(
    g: Geometry,
    xs: &CpuStorage,
    xl: &Layout,
    gs: &CpuStorage,
    gl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (x, grad) = (
        slice::<T>(xs, xl, "depthwise")?,
        slice::<T>(gs, gl, "depthwise weight grad")?,
    );
    let (oh, ow) = g.out_hw();
    let (plane_in, plane_out) = (g.h * g.w, oh * ow);
    let b = x.len() / (g.c * plane_in);
    let kk = g.k * g.k;
    let mut out = vec![T::zero(); g.c * kk];
    out.par_chunks_mut(kk).enumerate().for_each(|(c, dw)| {
        for n in 0..b {
            let p = n * g.c + c;
            let (s, gp) = (&x[p * plane_in..][..plane_in], &grad[p * plane_out..][..plane_out]);
            for i in 0..g.k {
                let (y0, y1) = g.valid(i, g.h, oh);
                for j in 0..g.k {
                    let (x0, x1) = g.valid(j, g.w, ow);
                    if x1 <= x0 {
                        continue;
                    }
                    let (ix0, len) = (x0 + j - g.pad, x1 - x0);
                    let mut acc = T::zero();
                    for oy in y0..y1 {
                        let (o_row, i_row) = (oy * ow, (oy + i - g.pad) * g.w);
                        acc += gp[o_row + x0..][..len]
                            .iter()
                            .zip(&s[i_row + ix0..][..len])
                            .fold(T::zero(), |a, (&u, &v)| a + u * v);
                    }
                    dw[i * g.k + j] += acc;
                }
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from((g.c, 1, g.k, g.k))))
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-weight-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype!(xs, self.name(), weight_grad(self.0, xs, xl, gs, gl))
    }
}

/// Depthwise cross-correlation of `x: (B, C, H, W)` with `w: (C, 1, k, k)`, stride 1, zero
/// padding `pad` (candle's `conv2d(w, pad, 1, 1, C)`), no bias: one fused op on the CPU in f32 /
/// f64, the sum of the k² shifted copies elsewhere.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, pad: usize) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (wc, one, k, k2) = w.dims4()?;
    if wc != c || one != 1 || k != k2 || h + 2 * pad < k || wd + 2 * pad < k {
        bail!(
            "depthwise conv2d: input {:?}, weight {:?} (expected (C, 1, k, k)), padding {pad} do not fit",
            x.dims(),
            w.dims()
        );
    }
    if fusable(x) && x.dtype() == w.dtype() {
        let g = Geometry { c, h, w: wd, k, pad };
        return x.contiguous()?.apply_op2(&w.contiguous()?, Depthwise(g));
    }
    depthwise_conv2d_composed(x, w, pad)
}

/// [`depthwise_conv2d`] as candle ops: Σ_ij pad(x)[.., i:i+H', j:j+W'] · w[:, i, j].
pub fn depthwise_conv2d_composed(x: &Tensor, w: &Tensor, pad: usize) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let k = w.dim(2)?;
    let xp = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    let (oh, ow) = (h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k);
    let taps = w.reshape((c, k * k))?;
    let mut y: Option<Tensor> = None;
    for i in 0..k {
        for j in 0..k {
            let tap = taps.narrow(1, i * k + j, 1)?.reshape((1, c, 1, 1))?;
            let term = xp.narrow(2, i, oh)?.narrow(3, j, ow)?.broadcast_mul(&tap)?;
            y = Some(match y {
                Some(y) => (y + term)?,
                None => term,
            });
        }
    }
    y.ok_or_else(|| candle_core::Error::Msg("depthwise conv2d: empty kernel".into()))
}
