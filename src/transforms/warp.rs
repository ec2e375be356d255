//! The finite affine warp (ρ(t)x)(u) = x(A·[u; 1]): bilinear, align_corners=True, with
//! reflection (without repeating the border pixel) or zero fill outside the image.
//!
//! Sampling positions are computed on the host (they depend only on the matrices and the grid),
//! the gather runs on the tensor's device with `index_select`, so the warp is differentiable in
//! the image and works batched on any device.

use super::{coord, Affine, Transform};
use candle_core::{Result, Tensor};

/// A blank (black) pixel of normalised images `(B, C, H, W)`: one value for every channel, or
/// one per channel (per-channel normalisation). A zero-padded warp of `x − blank`, plus `blank`,
/// fills the outside with it.
#[derive(Clone, Debug, PartialEq)]
pub struct Blank(Vec<f64>);

impl Blank {
    pub fn uniform(v: f64) -> Self {
        Blank(vec![v])
    }

    pub fn per_channel(vs: Vec<f64>) -> Self {
        Blank(vs)
    }

    /// `x − blank` (`sign` −1) or `x + blank` (`sign` 1), channels on axis 1.
    fn shift(&self, x: &Tensor, sign: f64) -> Result<Tensor> {
        match self.0.as_slice() {
            [v] => x.affine(1.0, sign * v),
            vs => {
                let t = Tensor::new(vs, x.device())?.to_dtype(x.dtype())?;
                let mut dims = vec![1; x.rank()];
                dims[1] = vs.len();
                x.broadcast_add(&(t.reshape(dims)? * sign)?)
            }
        }
    }

    /// `f(x − blank) + blank`: `f` (a zero-padded warp) with the outside reading as blank.
    pub fn around(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        self.shift(&f(&self.shift(x, -1.0)?)?, 1.0)
    }
}

/// What the warp reads outside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Zero fill (MNIST-rot's rotation).
    Zeros,
    /// Reflection about the border pixel centres, index i → W−1−|W−1−|i|| (the LEE convention).
    Reflect,
}

/// Reflect an integer index into [0, n) without repeating the border.
fn reflect(i: i64, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let m = 2 * (n as i64 - 1);
    let r = i.rem_euclid(m);
    (if r > n as i64 - 1 { m - r } else { r }) as usize
}

/// Warp `x: (B, C, H, W)` by one matrix per image (`mats.len() == B`) or one for all (`len 1`).
pub fn warp(x: &Tensor, mats: &[Affine], padding: Padding) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if mats.len() != b && mats.len() != 1 {
        candle_core::bail!("warp: {} matrices for a batch of {b}", mats.len());
    }
    let hw = h * w;
    // For each output pixel, four source rows of x viewed as (B·H·W, C), and their weights.
    let mut idx = Vec::with_capacity(b * 4 * hw);
    let mut wts = Vec::with_capacity(b * 4 * hw);
    for bi in 0..b {
        let a = mats[if mats.len() == 1 { 0 } else { bi }];
        let base = (bi * hw) as u32;
        let mut corner_idx = [
            Vec::with_capacity(hw),
            Vec::with_capacity(hw),
            Vec::with_capacity(hw),
            Vec::with_capacity(hw),
        ];
        let mut corner_w = [
            Vec::with_capacity(hw),
            Vec::with_capacity(hw),
            Vec::with_capacity(hw),
            Vec::with_capacity(hw),
        ];
        for i in 0..h {
            for j in 0..w {
                let (ux, uy) = (coord(j, w), coord(i, h));
                let sx = a[0][0] * ux + a[0][1] * uy + a[0][2];
                let sy = a[1][0] * ux + a[1][1] * uy + a[1][2];
                // Back to pixel units.
                let px = (sx + 1.0) * (w.max(2) - 1) as f64 / 2.0;
                let py = (sy + 1.0) * (h.max(2) - 1) as f64 / 2.0;
                let (x0, y0) = (px.floor(), py.floor());
                let (fx, fy) = (px - x0, py - y0);
                let (x0, y0) = (x0 as i64, y0 as i64);
                let corners = [
                    (y0, x0, (1.0 - fy) * (1.0 - fx)),
                    (y0, x0 + 1, (1.0 - fy) * fx),
                    (y0 + 1, x0, fy * (1.0 - fx)),
                    (y0 + 1, x0 + 1, fy * fx),
                ];
                for (k, (yy, xx, wt)) in corners.into_iter().enumerate() {
                    let (src, wt) = match padding {
                        Padding::Reflect => (reflect(yy, h) * w + reflect(xx, w), wt),
                        Padding::Zeros => {
                            if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
                                (0, 0.0)
                            } else {
                                (yy as usize * w + xx as usize, wt)
                            }
                        }
                    };
                    corner_idx[k].push(base + src as u32);
                    corner_w[k].push(wt);
                }
            }
        }
        for k in 0..4 {
            idx.extend_from_slice(&corner_idx[k]);
            wts.extend_from_slice(&corner_w[k]);
        }
    }
    let dev = x.device();
    let idx = Tensor::from_vec(idx, b * 4 * hw, dev)?;
    let wts = Tensor::from_vec(wts, (b, 4, hw, 1), dev)?.to_dtype(x.dtype())?;
    // (B, C, H, W) -> (B·H·W, C)
    let rows = x.permute((0, 2, 3, 1))?.reshape((b * hw, c))?;
    let picked = rows.index_select(&idx, 0)?.reshape((b, 4, hw, c))?;
    // Σ corners -> (B, H·W, C) -> (B, C, H, W)
    picked
        .broadcast_mul(&wts)?
        .sum(1)?
        .transpose(1, 2)?
        .reshape((b, c, h, w))
}

/// Apply `transform` with parameter `ts[i]` to image i of `x: (B, C, H, W)` (one `t` for all
/// when `ts.len() == 1`). `saturate` scales the (normalized) image by 1 + t.
pub fn apply(x: &Tensor, transform: Transform, ts: &[f64], padding: Padding) -> Result<Tensor> {
    if transform == Transform::Saturate {
        let b = x.dim(0)?;
        let f: Vec<f64> = (0..b).map(|i| 1.0 + ts[if ts.len() == 1 { 0 } else { i }]).collect();
        let f = Tensor::from_vec(f, (b, 1, 1, 1), x.device())?.to_dtype(x.dtype())?;
        return x.broadcast_mul(&f);
    }
    let mats: Vec<Affine> = ts.iter().filter_map(|&t| transform.matrix(t)).collect();
    warp(x, &mats, padding)
}
