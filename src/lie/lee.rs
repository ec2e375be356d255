//! The local equivariance error (LEE, paper Eq. 4): per image (1/K)·Σ_k (L_X p_k)² with
//! p = softmax(logits), or (1/K)·Σ_k |L_X p_k| (`abs`, what the reference code's CSVs hold).
//! `lee.output` picks what p is: the probabilities (the paper's), the logits, or a representation
//! (the pooled features the head reads, the ViT's patch tokens), k then running over its entries.
//! A representation's LEE scales with its size, so its scale-free form is reported beside it:
//! divided by the mean squared output value over the same images (`sq`), or by its square root
//! (`abs`), so that the features f and c·f have the same scale-free LEE.
//!
//! Every requested transform is measured in ONE primal pass: the input tangents L_X x of all
//! transforms are stacked on the tangent axis `(T, B, C, H, W)` and pushed through
//! [`Model::jvp`](crate::jvp::Jvp) together (DESIGN.md, "The Lie derivative"). The softmax JVP is
//! written from differentiable ops, so [`lee_penalty`] backprops into the weights (LEE-regularised
//! training). Means and standard errors over images are accumulated in f64 ([`MeanStderr`]).
//!
//! `x` is the image the model sees, i.e. the NORMALIZED image; L_X is taken of it.

use crate::config::LeeConfig;
pub use crate::config::{LeeOutput, Statistic};
use crate::jvp::Tape;
use crate::kernels::softmax;
use crate::models::{Model, Readout};
use crate::transforms::{image_lie_derivative, Stencil, Transform};
use candle_core::{DType, Result, Tensor, D};

/// Input tangents of every transform stacked on the tangent axis:
/// `x: (B, C, H, W)` → `(T, B, C, H, W)`.
pub fn input_tangents(x: &Tensor, transforms: &[Transform], stencil: Stencil) -> Result<Tensor> {
    let parts = transforms
        .iter()
        .map(|&t| image_lie_derivative(x, t, stencil))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&parts, 0)
}

/// Softmax over the last axis and its JVP, from differentiable ops (candle's fused softmax has
/// no backward). `logits: (B, K)`, `dlogits: (T, B, K)` → `p: (B, K)`, `dp: (T, B, K)` with
/// dp = p ⊙ (dl − Σ_k p_k dl_k).
pub fn softmax_jvp(logits: &Tensor, dlogits: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = softmax(logits)?;
    let p_t = p.unsqueeze(0)?; // (1, B, K)
    let mean_dl = dlogits.broadcast_mul(&p_t)?.sum_keepdim(D::Minus1)?; // (T, B, 1)
    let dp = dlogits.broadcast_sub(&mean_dl)?.broadcast_mul(&p_t)?;
    Ok((p, dp))
}

/// The Lie derivative of one output of a model, every transform from one primal pass.
pub struct OutputDerivative {
    /// The logits, for the accuracy measured beside it.
    pub logits: Tensor,
    /// The output per image, flattened: `(B, M)`.
    pub y: Tensor,
    /// L_X of the output per transform: `(T, B, M)`.
    pub d: Tensor,
}

/// L_X of `output` for every transform of `x: (B, C, H, W)` in one primal pass.
pub fn output_lie_derivative(
    model: &dyn Model,
    x: &Tensor,
    transforms: &[Transform],
    stencil: Stencil,
    output: LeeOutput,
) -> Result<OutputDerivative> {
    let dx = input_tangents(x, transforms, stencil)?;
    let r = model.jvp_at(x, &dx, &mut Tape::off(), readout(output))?;
    let (y, d) = match output {
        LeeOutput::Probs => softmax_jvp(&r.logits, &r.dy)?,
        _ => (r.y, r.dy),
    };
    let b = y.dim(0)?;
    Ok(OutputDerivative {
        logits: r.logits,
        y: y.reshape((b, ()))?,
        d: d.reshape((transforms.len(), b, ()))?,
    })
}

/// Where the model's JVP stops for `output` (the softmax is applied here, not in the model).
pub fn readout(output: LeeOutput) -> Readout {
    match output {
        LeeOutput::Probs | LeeOutput::Logits => Readout::Logits,
        LeeOutput::Features => Readout::Features,
        LeeOutput::Tokens => Readout::Tokens,
    }
}

/// Per-image statistic of an output Lie derivative `d: (T, B, K)` → `(T, B)`.
pub fn reduce_statistic(d: &Tensor, statistic: Statistic) -> Result<Tensor> {
    match statistic {
        Statistic::Sq => d.sqr()?.mean(D::Minus1),
        Statistic::Abs => d.abs()?.mean(D::Minus1),
    }
}

/// LEE of every image for every transform: `result[t][b]`, `x: (B, C, H, W)` normalized (the
/// raw form; see [`LeeSummary::entries`] for the scale-free one).
pub fn lee_per_image(
    model: &dyn Model,
    x: &Tensor,
    transforms: &[Transform],
    stencil: Stencil,
    statistic: Statistic,
    output: LeeOutput,
) -> Result<Vec<Vec<f64>>> {
    let o = output_lie_derivative(model, x, transforms, stencil, output)?;
    reduce_statistic(&o.d, statistic)?.to_dtype(DType::F64)?.to_vec2()
}

/// Differentiable mean squared LEE of `output` over images and `transforms`: a scalar tensor
/// whose gradient reaches the weights through the tangent's candle ops. For a representation it
/// is the scale-free form (over this batch), so the penalty cannot be lowered by shrinking the
/// features.
pub fn lee_penalty(
    model: &dyn Model,
    x: &Tensor,
    transforms: &[Transform],
    stencil: Stencil,
    output: LeeOutput,
) -> Result<Tensor> {
    let o = output_lie_derivative(model, x, transforms, stencil, output)?;
    let raw = o.d.sqr()?.mean_all()?;
    if output.is_representation() {
        raw / o.y.sqr()?.mean_all()?
    } else {
        Ok(raw)
    }
}

/// Running mean and standard error of the mean (Welford, f64).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeanStderr {
    n: usize,
    mean: f64,
    m2: f64,
}

impl MeanStderr {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, v: f64) {
        self.n += 1;
        let delta = v - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (v - self.mean);
    }

    pub fn extend<I: IntoIterator<Item = f64>>(&mut self, vs: I) {
        for v in vs {
            self.push(v);
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The mean (0 when empty).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Sample standard deviation / √n; 0 with fewer than two values (no spread is measurable).
    pub fn stderr(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        (self.m2 / (self.n - 1) as f64 / self.n as f64).sqrt()
    }
}

/// LEE and accuracy of one split.
#[derive(Clone, Debug)]
pub struct LeeSummary {
    pub n: usize,
    /// Fraction of argmax(logits) == label (`None` without labels).
    pub accuracy: Option<f64>,
    /// One accumulator per requested transform, in the requested order (the raw form).
    pub lee: Vec<(Transform, MeanStderr)>,
    pub statistic: Statistic,
    /// For a representation output: each image's mean squared output value, over the images.
    pub scale: Option<MeanStderr>,
}

/// One reported LEE number of a split.
#[derive(Clone, Debug, PartialEq)]
pub struct LeeEntry {
    /// The transform's name, with `_scaled` for the scale-free form.
    pub name: String,
    pub mean: f64,
    pub stderr: f64,
    pub n: usize,
}

impl LeeSummary {
    /// The numbers to report: the LEE of every transform, then (for a representation) their
    /// scale-free forms, the mean and its stderr divided by the mean squared output value (`sq`)
    /// or its root (`abs`), which is treated as exact (it is averaged over the same images).
    pub fn entries(&self) -> Vec<LeeEntry> {
        let entry = |name: String, m: &MeanStderr, div: f64| LeeEntry {
            name,
            mean: m.mean() / div,
            stderr: m.stderr() / div,
            n: m.n(),
        };
        let mut out: Vec<LeeEntry> = self.lee.iter().map(|(t, m)| entry(t.name().into(), m, 1.0)).collect();
        if let Some(scale) = &self.scale {
            let div = match self.statistic {
                Statistic::Sq => scale.mean(),
                Statistic::Abs => scale.mean().sqrt(),
            };
            out.extend(
                self.lee
                    .iter()
                    .map(|(t, m)| entry(format!("{}_scaled", t.name()), m, div)),
            );
        }
        out
    }
}

/// What an LEE measurement computes (the `lee` config section).
#[derive(Clone, Debug)]
pub struct LeeSpec {
    pub transforms: Vec<Transform>,
    pub stencil: Stencil,
    pub statistic: Statistic,
    pub output: LeeOutput,
    pub batch_size: usize,
}

impl LeeSpec {
    pub fn of(l: &LeeConfig) -> Self {
        Self {
            transforms: l.transforms.clone(),
            stencil: l.stencil,
            statistic: l.statistic,
            output: l.output,
            batch_size: l.batch_size,
        }
    }
}

/// Accumulates LEE and accuracy over the batches of a split.
#[derive(Clone, Debug)]
pub struct LeeAccumulator {
    lee: Vec<(Transform, MeanStderr)>,
    statistic: Statistic,
    scale: Option<MeanStderr>,
    correct: usize,
    labelled: usize,
    n: usize,
}

impl LeeAccumulator {
    pub fn new(spec: &LeeSpec) -> Self {
        Self {
            lee: spec.transforms.iter().map(|&t| (t, MeanStderr::new())).collect(),
            statistic: spec.statistic,
            scale: spec.output.is_representation().then(MeanStderr::new),
            correct: 0,
            labelled: 0,
            n: 0,
        }
    }

    /// Measure one batch `x: (B, C, H, W)` (labels `(B,)`, optional). Fails on a non-finite
    /// Lie derivative, naming the images.
    pub fn push(&mut self, model: &dyn Model, x: &Tensor, labels: Option<&Tensor>, spec: &LeeSpec) -> Result<()> {
        let len = x.dim(0)?;
        let o = output_lie_derivative(model, x, &spec.transforms, spec.stencil, spec.output)?;
        let per: Vec<Vec<f64>> = reduce_statistic(&o.d, spec.statistic)?
            .to_dtype(DType::F64)?
            .to_vec2()?;
        for ((t, acc), vals) in self.lee.iter_mut().zip(per) {
            if let Some(v) = vals.iter().find(|v| !v.is_finite()) {
                candle_core::bail!(
                    "non-finite {t} Lie derivative ({v}) in images {}..{}",
                    self.n,
                    self.n + len
                );
            }
            acc.extend(vals);
        }
        if let Some(scale) = &mut self.scale {
            scale.extend(o.y.sqr()?.mean(D::Minus1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        if let Some(labels) = labels {
            let pred = o.logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
            let y = labels.to_dtype(DType::U32)?;
            self.correct += pred.eq(&y)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
            self.labelled += len;
        }
        self.n += len;
        Ok(())
    }

    pub fn finish(self) -> LeeSummary {
        LeeSummary {
            n: self.n,
            accuracy: (self.labelled > 0).then(|| self.correct as f64 / self.labelled as f64),
            lee: self.lee,
            statistic: self.statistic,
            scale: self.scale,
        }
    }
}

/// LEE (and accuracy, given labels) over a whole split `images: (N, C, H, W)`, in batches of
/// `spec.batch_size`.
pub fn lee_split(model: &dyn Model, images: &Tensor, labels: Option<&Tensor>, spec: &LeeSpec) -> Result<LeeSummary> {
    let n = images.dim(0)?;
    let bs = spec.batch_size.max(1);
    let mut acc = LeeAccumulator::new(spec);
    for start in (0..n).step_by(bs) {
        let len = bs.min(n - start);
        let y = labels.map(|l| l.narrow(0, start, len)).transpose()?;
        acc.push(model, &images.narrow(0, start, len)?, y.as_ref(), spec)?;
    }
    Ok(acc.finish())
}
