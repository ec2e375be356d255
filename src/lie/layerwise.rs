//! Layerwise decomposition of the Lie derivative (paper Eq. 6, Figure 4):
//! L_X p = Σ_i J_{N:i+1}·L_X f_i, one term per network step (every layer and every non-layer op).
//!
//! The mechanism lives in [`Tape::layerwise`]: with dx = L_X x (T = 1) every step swaps its
//! tangent for its output's canonical Lie derivative and appends its own error as a new tangent
//! channel, so the model's output tangent holds, in channel i ≥ 1, step i's contribution at the
//! logits. Here those channels are pushed through the softmax, reduced to ‖c_i‖²/K per image
//! (exactly, or with Hutchinson probes E_z[(zᵀc)²] = ‖c‖² for large K, as the reference's
//! Appendix B.3 does), checked against a separate end-to-end pass (the contributions must sum
//! to it), and accumulated over batches. The steps' local errors also give the layerwise
//! EQ-T_frac of Karras et al. (2021) in its subpixel limit, with both the N and √N normalisations
//! the paper contrasts (Figure 4, right).

use super::lee::{output_lie_derivative, readout, softmax_jvp, LeeOutput, MeanStderr};
use crate::jvp::{pad_channels, StepKind, StepRecord, Tape};
use crate::models::{Model, Rng};
use crate::transforms::{image_lie_derivative, Stencil, Transform};
use candle_core::{DType, Result, Tensor, D};
use rand::Rng as _;

/// The decomposition of one batch for one transform.
#[derive(Debug)]
pub struct Decomposition {
    /// The steps in network order; step i's contribution is `contributions[i]`.
    pub steps: Vec<StepRecord>,
    /// J_{N:i+1}·e_i at the output, `(S, B, K)`.
    pub contributions: Tensor,
    /// Output tangent channel 0: L_X of the (invariant) output, 0 when every op is a step.
    pub canonical: Tensor,
    /// L_X out from a separate plain JVP pass, `(B, K)`.
    pub end_to_end: Tensor,
}

/// Decompose L_X of `output` of `x: (B, C, H, W)`: the probabilities, the logits or the pooled
/// features (an invariant output; the tokens are not, and have no decomposition into errors).
pub fn decompose(
    model: &dyn Model,
    x: &Tensor,
    transform: Transform,
    stencil: Stencil,
    output: LeeOutput,
) -> Result<Decomposition> {
    if output == LeeOutput::Tokens {
        candle_core::bail!(
            "the layerwise decomposition needs an invariant output (probs, logits or features); tokens move with the image"
        );
    }
    let mut tape = Tape::layerwise(transform, stencil);
    let dx = image_lie_derivative(x, transform, stencil)?.unsqueeze(0)?; // (1, B, C, H, W)
    let r = model.jvp_at(x, &dx, &mut tape, readout(output))?;
    let steps = tape.steps().to_vec();
    let s = steps.len();
    let dy = pad_channels(&r.dy, s + 1)?; // (1 + S, B, K)
    let d = match output {
        LeeOutput::Probs => softmax_jvp(&r.logits, &dy)?.1,
        _ => dy,
    };
    let e2e = output_lie_derivative(model, x, &[transform], stencil, output)?.d;
    Ok(Decomposition {
        steps,
        contributions: d.narrow(0, 1, s)?,
        canonical: d.get(0)?,
        end_to_end: e2e.get(0)?,
    })
}

/// Per-image ‖c‖² of `c: (S, B, K)` → `(S, B)`, exactly.
pub fn exact_sq_norms(c: &Tensor) -> Result<Tensor> {
    c.sqr()?.sum(D::Minus1)
}

/// Hutchinson estimate of ‖c‖² for `c: (S, B, K)` → `(S, B)`: the mean of (zᵀc)² over `probes`
/// Rademacher vectors z ∈ {±1}^K (unbiased; E[zzᵀ] = I). One set of probes serves all steps.
pub fn hutchinson_sq_norms(c: &Tensor, probes: usize, rng: &mut Rng) -> Result<Tensor> {
    let k = c.dim(D::Minus1)?;
    let z: Vec<f32> = (0..k * probes)
        .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
        .collect();
    let z = Tensor::from_vec(z, (k, probes), c.device())?.to_dtype(c.dtype())?;
    // (S, B, K) @ (K, P) -> (S, B, P)
    c.broadcast_matmul(&z)?.sqr()?.mean(D::Minus1)
}

/// One step's line in the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepContribution {
    pub index: usize,
    pub step: String,
    pub kind: StepKind,
    /// Mean over images of ‖J_{N:i+1}·L_X f_i‖²/K.
    pub contribution: f64,
    pub stderr: f64,
    /// contribution / Σ_j contribution_j.
    pub share: f64,
    /// Σ_{j ≤ i} share_j (Figure 4's curve).
    pub cumulative: f64,
    /// Layerwise EQ-T_frac (subpixel limit), mean over images of ‖e_i‖²/N_i.
    pub eq_t_frac_n: f64,
    /// The same with the √N_i normalisation: ‖e_i‖²/√N_i.
    pub eq_t_frac_sqrt_n: f64,
}

/// The decomposition of one transform over a split.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerwiseReport {
    pub transform: Transform,
    pub n: usize,
    /// Mean over images of ‖L_X out‖²/K from the plain pass (the LEE of Eq. 4).
    pub end_to_end: f64,
    pub steps: Vec<StepContribution>,
    /// ‖Σ_i c_i − L_X out‖ / ‖L_X out‖ over all images.
    pub sum_rel_error: f64,
    /// Hutchinson probes used (0 = exact norms).
    pub probes: usize,
}

/// Accumulates [`Decomposition`]s of successive batches.
#[derive(Debug)]
pub struct LayerwiseAccumulator {
    transform: Transform,
    probes: usize,
    names: Vec<(String, StepKind)>,
    contrib: Vec<MeanStderr>,
    eq_n: Vec<MeanStderr>,
    eq_sqrt_n: Vec<MeanStderr>,
    e2e: MeanStderr,
    residual_sq: f64,
    e2e_sq: f64,
}

impl LayerwiseAccumulator {
    /// `probes = 0`: exact norms; otherwise Hutchinson with that many probes per image.
    pub fn new(transform: Transform, probes: usize) -> Self {
        Self {
            transform,
            probes,
            names: Vec::new(),
            contrib: Vec::new(),
            eq_n: Vec::new(),
            eq_sqrt_n: Vec::new(),
            e2e: MeanStderr::new(),
            residual_sq: 0.0,
            e2e_sq: 0.0,
        }
    }

    /// The transform being decomposed.
    pub fn transform(&self) -> Transform {
        self.transform
    }

    pub fn push(&mut self, d: &Decomposition, rng: &mut Rng) -> Result<()> {
        let names: Vec<(String, StepKind)> = d.steps.iter().map(|s| (s.name.clone(), s.kind)).collect();
        if self.names.is_empty() {
            let s = names.len();
            self.names = names;
            self.contrib = vec![MeanStderr::new(); s];
            self.eq_n = vec![MeanStderr::new(); s];
            self.eq_sqrt_n = vec![MeanStderr::new(); s];
        } else if self.names != names {
            candle_core::bail!(
                "layerwise: the model took different steps on two batches ({} vs {})",
                self.names.len(),
                names.len()
            );
        }
        let k = d.end_to_end.dim(D::Minus1)? as f64;
        let sq = if self.probes == 0 {
            exact_sq_norms(&d.contributions)?
        } else {
            hutchinson_sq_norms(&d.contributions, self.probes, rng)?
        };
        let sq: Vec<Vec<f64>> = (sq / k)?.to_dtype(DType::F64)?.to_vec2()?;
        for (acc, v) in self.contrib.iter_mut().zip(sq) {
            acc.extend(v);
        }
        for ((rec, n), sn) in d.steps.iter().zip(&mut self.eq_n).zip(&mut self.eq_sqrt_n) {
            let numel = rec.numel.max(1) as f64;
            n.extend(rec.error_sq.iter().map(|e| e / numel));
            sn.extend(rec.error_sq.iter().map(|e| e / numel.sqrt()));
        }
        let e2e = d.end_to_end.to_dtype(DType::F64)?;
        let sum = d.contributions.to_dtype(DType::F64)?.sum(0)?;
        self.residual_sq += (sum - &e2e)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        self.e2e_sq += e2e.sqr()?.sum_all()?.to_scalar::<f64>()?;
        self.e2e.extend((e2e.sqr()?.sum(D::Minus1)? / k)?.to_vec1::<f64>()?);
        Ok(())
    }

    pub fn finish(self) -> LayerwiseReport {
        let total: f64 = self.contrib.iter().map(|c| c.mean()).sum();
        let share = |v: f64| if total > 0.0 { v / total } else { 0.0 };
        let mut cumulative = 0.0;
        let steps = self
            .names
            .into_iter()
            .zip(&self.contrib)
            .zip(self.eq_n.iter().zip(&self.eq_sqrt_n))
            .enumerate()
            .map(|(index, (((step, kind), c), (n, sn)))| {
                cumulative += share(c.mean());
                StepContribution {
                    index,
                    step,
                    kind,
                    contribution: c.mean(),
                    stderr: c.stderr(),
                    share: share(c.mean()),
                    cumulative,
                    eq_t_frac_n: n.mean(),
                    eq_t_frac_sqrt_n: sn.mean(),
                }
            })
            .collect();
        let sum_rel_error = if self.e2e_sq > 0.0 {
            (self.residual_sq / self.e2e_sq).sqrt()
        } else {
            self.residual_sq.sqrt()
        };
        LayerwiseReport {
            transform: self.transform,
            n: self.e2e.n(),
            end_to_end: self.e2e.mean(),
            steps,
            sum_rel_error,
            probes: self.probes,
        }
    }
}

/// Layerwise report of one transform over `images: (N, C, H, W)` in batches of `batch_size`.
#[allow(clippy::too_many_arguments)]
pub fn layerwise_split(
    model: &dyn Model,
    images: &Tensor,
    transform: Transform,
    stencil: Stencil,
    output: LeeOutput,
    batch_size: usize,
    probes: usize,
    rng: &mut Rng,
) -> Result<LayerwiseReport> {
    let n = images.dim(0)?;
    let bs = batch_size.max(1);
    let mut acc = LayerwiseAccumulator::new(transform, probes);
    for start in (0..n).step_by(bs) {
        let x = images.narrow(0, start, bs.min(n - start))?;
        acc.push(&decompose(model, &x, transform, stencil, output)?, rng)?;
    }
    Ok(acc.finish())
}
