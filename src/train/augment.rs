//! On-the-fly augmentation of training batches, each part off or on from `[augment]`: a random
//! rotation / translation / scale (one affine matrix per image, applied by
//! [`crate::transforms::warp`]), random erasing (Zhong et al. 2020, timm's `RandomErasing` in
//! "pixel" mode), and mixup / cutmix with soft targets (timm's `Mixup`: the batch is mixed with
//! its reverse, one λ per batch; with both on, each batch picks one with probability ½).
//! All randomness comes from the caller's seeded [`Rng`].

use crate::config::AugmentConfig;
use crate::models::Rng;
use crate::transforms::{warp, Affine, Blank, Padding};
use candle_core::{Device, Result, Tensor};
use rand::Rng as _;
use rand_distr::{Beta, Distribution, StandardNormal};

/// A training batch after augmentation.
pub struct Augmented {
    /// Images `(B, C, H, W)`, normalised.
    pub x: Tensor,
    /// Soft targets `(B, K)` (label smoothing and mixing applied), rows sum to 1.
    pub targets: Tensor,
}

/// Smoothed one-hot targets `(B, K)`: `1 − s + s/K` on the label, `s/K` elsewhere (timm).
pub fn soft_targets(labels: &[u32], k: usize, smoothing: f64, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(one_hot(labels, k, smoothing), (labels.len(), k), device)
}

fn one_hot(labels: &[u32], k: usize, smoothing: f64) -> Vec<f32> {
    let off = (smoothing / k as f64) as f32;
    let on = (1.0 - smoothing) as f32 + off;
    let mut out = vec![off; labels.len() * k];
    for (i, &l) in labels.iter().enumerate() {
        out[i * k + l as usize] = on;
    }
    out
}

/// The augmentation of one run.
pub struct Augmenter {
    cfg: AugmentConfig,
    num_classes: usize,
    label_smoothing: f64,
    /// A blank pixel in normalised units (−mean/std): what geometric warps fill with.
    fill: Blank,
}

impl Augmenter {
    pub fn new(cfg: &AugmentConfig, num_classes: usize, label_smoothing: f64, fill: Blank) -> Self {
        Self {
            cfg: cfg.clone(),
            num_classes,
            label_smoothing,
            fill,
        }
    }

    fn geometric(&self) -> bool {
        self.cfg.rotate_deg > 0.0 || self.cfg.translate > 0.0 || self.cfg.scale > 0.0
    }

    /// One random sampling matrix: rotation θ ∈ [−r, r], isotropic scale s ∈ [1−σ, 1+σ] and a
    /// translation in [−t, t]², composed as x(s·R(θ)·u + t).
    fn sample_matrix(&self, rng: &mut Rng) -> Affine {
        let c = &self.cfg;
        let th = if c.rotate_deg > 0.0 {
            rng.random_range(-c.rotate_deg..=c.rotate_deg).to_radians()
        } else {
            0.0
        };
        let s = if c.scale > 0.0 {
            rng.random_range(1.0 - c.scale..=1.0 + c.scale)
        } else {
            1.0
        };
        let (tx, ty) = if c.translate > 0.0 {
            (
                rng.random_range(-c.translate..=c.translate),
                rng.random_range(-c.translate..=c.translate),
            )
        } else {
            (0.0, 0.0)
        };
        let (sn, cs) = th.sin_cos();
        [[s * cs, s * sn, tx], [-s * sn, s * cs, ty]]
    }

    /// Augment `x: (B, C, H, W)` with integer `labels` (length B).
    pub fn apply(&self, x: &Tensor, labels: &[u32], rng: &mut Rng) -> Result<Augmented> {
        let (b, c, h, w) = x.dims4()?;
        if labels.len() != b {
            candle_core::bail!("augment: {} labels for a batch of {b}", labels.len());
        }
        let device = x.device().clone();
        let mut x = x.clone();
        if self.geometric() {
            let mats: Vec<Affine> = (0..b).map(|_| self.sample_matrix(rng)).collect();
            x = self.fill.around(&x, |x| warp(x, &mats, Padding::Zeros))?;
        }
        let mut targets = one_hot(labels, self.num_classes, self.label_smoothing);
        let mixing = self.cfg.mixup_alpha > 0.0 || self.cfg.cutmix_alpha > 0.0;
        if self.cfg.erase_prob > 0.0 || mixing {
            let shape = (b, c, h, w);
            let mut px = x.flatten_all()?.to_vec1::<f32>()?;
            let plane = c * h * w;
            if self.cfg.erase_prob > 0.0 {
                for img in px.chunks_mut(plane) {
                    if rng.random::<f64>() < self.cfg.erase_prob {
                        erase(img, c, h, w, rng);
                    }
                }
            }
            if mixing {
                self.mix(&mut px, &mut targets, (b, c, h, w), rng)?;
            }
            x = Tensor::from_vec(px, shape, &device)?;
        }
        let targets = Tensor::from_vec(targets, (b, self.num_classes), &device)?;
        Ok(Augmented { x, targets })
    }

    /// Mixup or cutmix of the batch with its reverse (image i with image B−1−i), one λ per batch.
    fn mix(
        &self,
        px: &mut [f32],
        targets: &mut [f32],
        dims: (usize, usize, usize, usize),
        rng: &mut Rng,
    ) -> Result<()> {
        let (b, c, h, w) = dims;
        let (ma, ca) = (self.cfg.mixup_alpha, self.cfg.cutmix_alpha);
        let use_cutmix = if ma > 0.0 && ca > 0.0 {
            rng.random::<bool>()
        } else {
            ca > 0.0
        };
        let alpha = if use_cutmix { ca } else { ma };
        let beta =
            Beta::new(alpha, alpha).map_err(|e| candle_core::Error::Msg(format!("augment: Beta({alpha}): {e}")))?;
        let mut lam: f64 = beta.sample(rng);
        let orig = px.to_vec();
        let plane = c * h * w;
        if use_cutmix {
            // A box of area ≈ (1 − λ)·H·W at a uniform centre, clipped; λ is then the kept area.
            let cut = (1.0 - lam).sqrt();
            let (ch, cw) = ((h as f64 * cut) as usize, (w as f64 * cut) as usize);
            let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
            let (y0, y1) = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(h));
            let (x0, x1) = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(w));
            for i in 0..b {
                let j = b - 1 - i;
                for ci in 0..c {
                    for y in y0..y1 {
                        let row = ci * h * w + y * w;
                        px[i * plane + row + x0..i * plane + row + x1]
                            .copy_from_slice(&orig[j * plane + row + x0..j * plane + row + x1]);
                    }
                }
            }
            lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
        } else {
            let (l, r) = (lam as f32, (1.0 - lam) as f32);
            for i in 0..b {
                let j = b - 1 - i;
                for (p, q) in px[i * plane..(i + 1) * plane]
                    .iter_mut()
                    .zip(&orig[j * plane..(j + 1) * plane])
                {
                    *p = l * *p + r * q;
                }
            }
        }
        let k = self.num_classes;
        let t0 = targets.to_vec();
        let (l, r) = (lam as f32, (1.0 - lam) as f32);
        for i in 0..b {
            let j = b - 1 - i;
            for kk in 0..k {
                targets[i * k + kk] = l * t0[i * k + kk] + r * t0[j * k + kk];
            }
        }
        Ok(())
    }
}

/// Random erasing of one image `(C, H, W)`: a rectangle of 2–33% of the area with aspect ratio
/// log-uniform in [0.3, 3.3], filled with standard-normal noise (timm "pixel" mode); up to 10
/// tries to fit one inside the image, as timm does.
fn erase(img: &mut [f32], c: usize, h: usize, w: usize, rng: &mut Rng) {
    let area = (h * w) as f64;
    for _ in 0..10 {
        let target = rng.random_range(0.02..1.0 / 3.0) * area;
        let ratio = rng.random_range(0.3f64.ln()..3.3f64.ln()).exp();
        let eh = (target * ratio).sqrt().round() as usize;
        let ew = (target / ratio).sqrt().round() as usize;
        if eh == 0 || ew == 0 || eh >= h || ew >= w {
            continue;
        }
        let (y0, x0) = (rng.random_range(0..=h - eh), rng.random_range(0..=w - ew));
        for ci in 0..c {
            for y in y0..y0 + eh {
                for x in x0..x0 + ew {
                    img[ci * h * w + y * w + x] = StandardNormal.sample(rng);
                }
            }
        }
        return;
    }
}
