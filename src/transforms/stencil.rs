//! Pixel derivatives (stencils) and the Lie derivative of an image-like value:
//! (L_X x)(u) = ∂x/∂u_x·X_x(u) + ∂x/∂u_y·X_y(u), ∂/∂u_x = (W−1)/2 · D_x (DESIGN.md).

use super::{coord, Transform};
use candle_core::{Result, Tensor};

/// What a step's output is, so that its own ("canonical") Lie derivative can be formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repr {
    /// `(B, C, H, W)` feature map on an H×W grid.
    Image,
    /// `(B, prefix + h·w, C)` tokens on an h×w grid after `prefix` non-spatial tokens (class,
    /// distillation, register tokens: their Lie derivative is zero).
    Tokens { h: usize, w: usize, prefix: usize },
    /// `(B, C, N, H, W)` C_N group feature map: the grid derivative acts on the last two axes;
    /// the orientation axis has no infinitesimal generator for a finite group and is left alone.
    Group,
    /// A value the transforms act on trivially (pooled features, logits, probabilities).
    Invariant,
}

/// How D_x is computed on the pixel grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stencil {
    /// (x[j+1] − x[j−1]) / 2 with reflection at the border: the symmetric derivative of the
    /// bilinear warp, and it commutes with convolution.
    Central,
    /// x[j+1] − x[j]: what bilinear interpolation gives at t = 0 with a consistent floor.
    Forward,
    /// Band-limited derivative by DFT of the periodic signal (the view of Theorem 1).
    Spectral,
}

impl Stencil {
    pub fn name(self) -> &'static str {
        match self {
            Stencil::Central => "central",
            Stencil::Forward => "forward",
            Stencil::Spectral => "spectral",
        }
    }
}

/// The grid axis of a derivative: X is the last (column) axis, Y the one before it (rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    X,
    Y,
}

/// Pixel derivative D of `x: (..., H, W)` along `axis`, in units of 1/pixel.
pub fn grid_derivative(x: &Tensor, axis: Axis, stencil: Stencil) -> Result<Tensor> {
    let dim = match axis {
        Axis::X => x.rank() - 1,
        Axis::Y => x.rank() - 2,
    };
    let n = x.dim(dim)?;
    if n < 2 {
        return x.zeros_like();
    }
    match stencil {
        Stencil::Central | Stencil::Forward => {
            // Reflection without repeating the border: x[-1] = x[1], x[n] = x[n-2].
            let right = x.narrow(dim, n - 2, 1)?;
            let next = Tensor::cat(&[x.narrow(dim, 1, n - 1)?, right], dim)?;
            if stencil == Stencil::Forward {
                return next - x;
            }
            let left = x.narrow(dim, 1, 1)?;
            let prev = Tensor::cat(&[left, x.narrow(dim, 0, n - 1)?], dim)?;
            (next - prev)? * 0.5
        }
        Stencil::Spectral => {
            let d = Tensor::from_vec(spectral_matrix(n), (n, n), x.device())?.to_dtype(x.dtype())?;
            match axis {
                // (..., W) @ Dᵀ
                Axis::X => x.broadcast_matmul(&d.t()?),
                // D @ (..., H, W)
                Axis::Y => d.broadcast_matmul(x),
            }
        }
    }
}

/// Real n×n matrix of the band-limited derivative d/dj of an n-periodic sequence (DFT,
/// multiply by i·2πk/n, inverse DFT; the Nyquist term of an even n is dropped).
fn spectral_matrix(n: usize) -> Vec<f64> {
    let mut m = vec![0.0; n * n];
    let nf = n as f64;
    for (r, row) in m.chunks_mut(n).enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            // d/dj of the trigonometric interpolant of the unit impulse at c, evaluated at r.
            let mut s = 0.0;
            for k in 1..n.div_ceil(2) {
                let w = 2.0 * std::f64::consts::PI * k as f64 / nf;
                s += -2.0 * w * (w * (r as f64 - c as f64)).sin();
            }
            *v = s / nf;
        }
    }
    m
}

/// Lie derivative of images `x: (B, C, H, W)` (or any `(..., H, W)`) along `transform`.
pub fn image_lie_derivative(x: &Tensor, transform: Transform, stencil: Stencil) -> Result<Tensor> {
    let Some(b) = transform.generator() else {
        // saturate: d/dt (1 + t)·x = x.
        return Ok(x.clone());
    };
    let rank = x.rank();
    let (h, w) = (x.dim(rank - 2)?, x.dim(rank - 1)?);
    // Vector field X(u) = B·[u; 1] on the pixel grid, already scaled by (W−1)/2 and (H−1)/2.
    let (sx, sy) = ((w.max(2) - 1) as f64 / 2.0, (h.max(2) - 1) as f64 / 2.0);
    let mut fx = Vec::with_capacity(h * w);
    let mut fy = Vec::with_capacity(h * w);
    for i in 0..h {
        for j in 0..w {
            let (ux, uy) = (coord(j, w), coord(i, h));
            fx.push(sx * (b[0][0] * ux + b[0][1] * uy + b[0][2]));
            fy.push(sy * (b[1][0] * ux + b[1][1] * uy + b[1][2]));
        }
    }
    let mut out: Option<Tensor> = None;
    for (field, axis) in [(fx, Axis::X), (fy, Axis::Y)] {
        if field.iter().all(|v| *v == 0.0) {
            continue;
        }
        let f = Tensor::from_vec(field, (h, w), x.device())?.to_dtype(x.dtype())?;
        let term = grid_derivative(x, axis, stencil)?.broadcast_mul(&f)?;
        out = Some(match out {
            None => term,
            Some(o) => (o + term)?,
        });
    }
    match out {
        Some(o) => Ok(o),
        None => x.zeros_like(),
    }
}

/// The canonical Lie derivative of a network value with representation `repr`.
pub fn lie_derivative(y: &Tensor, repr: Repr, transform: Transform, stencil: Stencil) -> Result<Tensor> {
    match repr {
        Repr::Invariant => y.zeros_like(),
        // The transforms act on the input image only; a feature map has no saturation action.
        _ if transform == Transform::Saturate => y.zeros_like(),
        Repr::Image => image_lie_derivative(y, transform, stencil),
        Repr::Group => {
            let (b, c, n, h, w) = y.dims5()?;
            // (B, C, N, H, W) -> (B, C·N, H, W): the orientation axis is carried as channels.
            image_lie_derivative(&y.reshape((b, c * n, h, w))?, transform, stencil)?.reshape((b, c, n, h, w))
        }
        Repr::Tokens { h, w, prefix } => {
            let (b, n, c) = y.dims3()?;
            let start = prefix;
            if n != start + h * w {
                candle_core::bail!(
                    "tokens of shape {:?} do not match {prefix} prefix tokens and a {h}×{w} grid",
                    y.dims()
                );
            }
            // (B, h·w, C) -> (B, C, h, w)
            let grid = y.narrow(1, start, h * w)?.transpose(1, 2)?.reshape((b, c, h, w))?;
            let d = image_lie_derivative(&grid, transform, stencil)?;
            // (B, C, h, w) -> (B, h·w, C)
            let d = d.reshape((b, c, h * w))?.transpose(1, 2)?;
            if prefix > 0 {
                Tensor::cat(&[Tensor::zeros((b, prefix, c), y.dtype(), y.device())?, d], 1)?.contiguous()
            } else {
                d.contiguous()
            }
        }
    }
}
