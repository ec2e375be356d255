//! Invariance by averaging: any classifier made invariant to the rotation group C_N by
//! averaging its logits over the N rotations of its input, f̄(x) = (1/N)·Σ_k f(R_k x) with R_k
//! the rotation by 2πk/N (`model.average_rotations = N`). A third answer to "architectural vs
//! learned" beside the G-CNN and augmentation (frame / group averaging). Its JVP is the average
//! of the model's JVPs at the rotated inputs with the tangent rotated along (R_k is linear), so
//! the LEE code measures it unchanged.
//!
//! R_k is the bilinear warp of `crate::transforms` about the image centre; outside the frame it
//! fills with `background` (the normalised value of a black pixel, as augmentation does), so the
//! primal map is affine and the tangent map linear. For N = 4 the warp samples grid points only
//! (cos and sin of multiples of π/2 are 0 and ±1 up to 6e-17): f̄(rot90(x)) = f̄(x) to float
//! precision.

use super::{Model, Readout, ReadoutJvp, Rng};
use crate::jvp::{merge_tangent, Jvp, Tape};
use crate::transforms::{apply, Blank, Padding, Transform};
use candle_core::{Result, Tensor};

pub struct RotationAveraged {
    inner: Box<dyn Model>,
    n: usize,
    background: Blank,
}

impl RotationAveraged {
    pub fn new(inner: Box<dyn Model>, n: usize, background: Blank) -> Self {
        Self { inner, n, background }
    }

    /// `(B, C, H, W)` → `(N·B, C, H, W)`: the N rotations of every image, rotation-major.
    /// `fill` is the background outside the frame (the tangents' is 0).
    fn rotations(&self, x: &Tensor, fill: &Blank) -> Result<Tensor> {
        let b = x.dim(0)?;
        let parts = (0..self.n)
            .map(|k| {
                let theta = std::f64::consts::TAU * k as f64 / self.n as f64;
                fill.around(x, |x| apply(x, Transform::Rotate, &vec![theta; b], Padding::Zeros))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    /// `(N·B, K)` (rotation-major) → `(B, K)`: the mean over the rotations.
    fn average(&self, y: &Tensor) -> Result<Tensor> {
        let (nb, k) = y.dims2()?;
        y.reshape((self.n, nb / self.n, k))?.mean(0)
    }
}

impl Jvp for RotationAveraged {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let r = self.jvp_at(x, dx, tape, Readout::Logits)?;
        Ok((r.y, r.dy))
    }
}

impl Model for RotationAveraged {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.average(&self.inner.forward(&self.rotations(x, &self.background)?)?)
    }

    fn forward_train(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.average(&self.inner.forward_train(&self.rotations(x, &self.background)?, rng)?)
    }

    fn set_grad_checkpointing(&mut self, on: bool) -> Result<()> {
        self.inner.set_grad_checkpointing(on)
    }

    /// The features are averaged like the logits (so they are C_N-invariant too); tokens move
    /// with the image and have no average (the config refuses them).
    fn jvp_at(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape, at: Readout) -> Result<ReadoutJvp> {
        if tape.is_recording() {
            candle_core::bail!(
                "the layerwise decomposition and the hidden-layer group metric of a rotation-averaged model \
                 are not defined step by step (its steps run on N rotated copies); measure the model without \
                 model.average_rotations"
            );
        }
        if at == Readout::Tokens {
            candle_core::bail!("a rotation-averaged model has no tokens: its copies' tokens are rotated apart");
        }
        // (T, B, C, H, W) → (T·B, …) → N rotations (N·T·B, …) → (N, T, B, …) → (T, N, B, …)
        // → (T, N·B, …): each tangent's copies in the primal's rotation-major order.
        let (t, b, c, h, w) = dx.dims5()?;
        let (merged, _) = merge_tangent(dx)?;
        let dxs = self
            .rotations(&merged, &Blank::uniform(0.0))?
            .reshape((self.n, t, b, c, h, w))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((t, self.n * b, c, h, w))?;
        let r = self
            .inner
            .jvp_at(&self.rotations(x, &self.background)?, &dxs, tape, at)?;
        let (_, nb, k) = r.dy.dims3()?;
        let dy = r.dy.reshape((t, self.n, nb / self.n, k))?.mean(1)?;
        Ok(ReadoutJvp {
            logits: self.average(&r.logits)?,
            y: self.average(&r.y)?,
            dy,
        })
    }
}
