//! The alternative equivariance metrics the paper compares LEE with (section 5, Figure 4 right,
//! Figure 5 left): integer-shift consistency (Zhang, 2019), EQ-T / EQ-T_frac / EQ-R (Karras et
//! al., 2021) and the sampled finite-transform invariance (Finzi et al., 2020; the reference
//! code's "sample" metrics).
//!
//! Every metric is an error of a function f on a batch `x: (B, C, H, W)`: for an invariant output
//! (class probabilities) mean_k (f(Tx) − f(x))², for an image-like output of the input's size
//! mean (f(Tx) − T f(x))². Each image's value is its mean over `draws` random transforms, so the
//! mean ± stderr is over images. Consistency is the argmax agreement under circular shifts of
//! 0..7 pixels along each axis (1 = consistent). Fractional shifts and rotations resample with a
//! Lanczos-windowed sinc (a = 3, zero fill): band-limited, so an integer shift is exact.

use super::lee::MeanStderr;
use crate::kernels::softmax;
use crate::models::{Model, Rng};
use crate::transforms::{apply, coord, warp, Affine, Padding, Transform};
use candle_core::{DType, Result, Tensor, D};
use rand::Rng as _;

/// The Lanczos window's half-width (taps per axis = 2a).
pub const LANCZOS_A: usize = 3;
/// Largest circular shift of the consistency metric, in pixels.
pub const CONSISTENCY_MAX_SHIFT: usize = 7;
/// Largest rotation of the sampled rotation invariance, radians (what the reference's
/// `np.pi//16` meant: `//` floors it to 0, so the reference never rotates).
pub const SAMPLE_MAX_ANGLE: f64 = std::f64::consts::PI / 16.0;

/// One alternative metric (LEE itself is measured by [`super::lee`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Consistency,
    EqT,
    EqTFrac,
    EqR,
    Sample,
}

impl Metric {
    pub const ALL: [Metric; 5] = [
        Metric::Consistency,
        Metric::EqT,
        Metric::EqTFrac,
        Metric::EqR,
        Metric::Sample,
    ];

    pub fn parse(name: &str) -> Option<Metric> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Consistency => "consistency",
            Metric::EqT => "eq_t",
            Metric::EqTFrac => "eq_t_frac",
            Metric::EqR => "eq_r",
            Metric::Sample => "sample",
        }
    }
}

/// How a transform acts on f's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Untouched (class probabilities, logits).
    Invariant,
    /// The same warp as the input (an image of the input's size).
    Image,
}

/// A metric's result over a split: mean ± stderr over images, each image the mean of `draws`.
#[derive(Clone, Debug)]
pub struct MetricStat {
    pub name: String,
    pub stat: MeanStderr,
    pub draws: usize,
}

/// sinc(t)·sinc(t/a) on |t| < a.
fn lanczos(t: f64) -> f64 {
    let a = LANCZOS_A as f64;
    if t.abs() >= a {
        return 0.0;
    }
    if t == 0.0 {
        return 1.0;
    }
    let pt = std::f64::consts::PI * t;
    a * pt.sin() * (pt / a).sin() / (pt * pt)
}

/// Tap indices and normalised weights around source position `p` (pixels).
fn taps(p: f64) -> (i64, [f64; 2 * LANCZOS_A]) {
    let first = p.floor() as i64 - LANCZOS_A as i64 + 1;
    let mut w = [0.0; 2 * LANCZOS_A];
    for (k, wk) in w.iter_mut().enumerate() {
        *wk = lanczos(p - (first + k as i64) as f64);
    }
    let s: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= s);
    (first, w)
}

/// Resample `x: (B, C, H, W)` at A·[u; 1] (same convention as [`warp`]) with the Lanczos-3
/// kernel and zero fill; one matrix per image or one for all. Runs on the host (eval only).
pub fn lanczos_warp(x: &Tensor, mats: &[Affine]) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if mats.len() != b && mats.len() != 1 {
        candle_core::bail!("lanczos_warp: {} matrices for a batch of {b}", mats.len());
    }
    let src: Vec<f64> = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut out = vec![0.0; src.len()];
    let (sx, sy) = ((w.max(2) - 1) as f64 / 2.0, (h.max(2) - 1) as f64 / 2.0);
    for bi in 0..b {
        let m = mats[if mats.len() == 1 { 0 } else { bi }];
        for i in 0..h {
            for j in 0..w {
                let (ux, uy) = (coord(j, w), coord(i, h));
                // Source position in pixels.
                let px = (m[0][0] * ux + m[0][1] * uy + m[0][2] + 1.0) * sx;
                let py = (m[1][0] * ux + m[1][1] * uy + m[1][2] + 1.0) * sy;
                let ((fx, wx), (fy, wy)) = (taps(px), taps(py));
                for ci in 0..c {
                    let plane = &src[(bi * c + ci) * h * w..][..h * w];
                    let mut acc = 0.0;
                    for (ky, wyk) in wy.iter().enumerate() {
                        let r = fy + ky as i64;
                        if r < 0 || r >= h as i64 {
                            continue;
                        }
                        for (kx, wxk) in wx.iter().enumerate() {
                            let col = fx + kx as i64;
                            if col >= 0 && col < w as i64 {
                                acc += wyk * wxk * plane[r as usize * w + col as usize];
                            }
                        }
                    }
                    out[((bi * c + ci) * h + i) * w + j] = acc;
                }
            }
        }
    }
    Tensor::from_vec(out, (b, c, h, w), x.device())?.to_dtype(x.dtype())
}

/// Circular shift of the last two axes by (`dx`, `dy`) pixels.
pub fn roll(x: &Tensor, dx: usize, dy: usize) -> Result<Tensor> {
    let r = x.rank();
    let mut y = x.clone();
    for (dim, s) in [(r - 1, dx), (r - 2, dy)] {
        let n = y.dim(dim)?;
        let s = s % n;
        if s > 0 {
            y = Tensor::cat(&[y.narrow(dim, n - s, s)?, y.narrow(dim, 0, n - s)?], dim)?;
        }
    }
    Ok(y)
}

/// The matrix that moves the image content by (`tx`, `ty`) pixels on a `h`×`w` grid.
fn shift_matrix(tx: f64, ty: f64, h: usize, w: usize) -> Affine {
    // Sampling at u − t moves the content by +t; one pixel is 2/(n−1) in u.
    let (ux, uy) = (2.0 * tx / (w.max(2) - 1) as f64, 2.0 * ty / (h.max(2) - 1) as f64);
    [[1.0, 0.0, -ux], [0.0, 1.0, -uy]]
}

/// Per-image mean squared difference of `a, b: (B, ...)`.
fn per_image_mse(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    (a - b)?
        .sqr()?
        .flatten_from(1)?
        .mean(1)?
        .to_dtype(DType::F64)?
        .to_vec1()
}

/// Per-image error of f under one transform per image (`t` maps a batch to its transformed
/// batch and is applied to image-like outputs too).
fn equivariance_error(
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    output: Output,
    x: &Tensor,
    fx: &Tensor,
    t: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Vec<f64>> {
    let ftx = f(&t(x)?)?;
    match output {
        Output::Invariant => per_image_mse(&ftx, fx),
        Output::Image => per_image_mse(&ftx, &t(fx)?),
    }
}

/// Per-image values of `metric` on `x: (B, C, H, W)`, as named series (consistency gives one
/// series per shift and their mean "consistency"; the others one series). Each value is the
/// mean over `draws` random transforms (consistency: over its fixed shifts).
pub fn metric_per_image(
    metric: Metric,
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    output: Output,
    x: &Tensor,
    draws: usize,
    rng: &mut Rng,
) -> Result<Vec<(String, Vec<f64>)>> {
    let (b, _, h, w) = x.dims4()?;
    let fx = f(x)?;
    if metric == Metric::Consistency {
        let pred = fx.flatten_from(1)?.argmax(D::Minus1)?;
        let mut series = Vec::new();
        let mut overall = vec![0.0; b];
        for (axis, shift) in ["x", "y"]
            .iter()
            .flat_map(|a| (0..=CONSISTENCY_MAX_SHIFT).map(move |s| (*a, s)))
        {
            let (dx, dy) = if axis == "x" { (shift, 0) } else { (0, shift) };
            let p = f(&roll(x, dx, dy)?)?.flatten_from(1)?.argmax(D::Minus1)?;
            let agree: Vec<f64> = p.eq(&pred)?.to_dtype(DType::F64)?.to_vec1()?;
            overall.iter_mut().zip(&agree).for_each(|(o, a)| *o += a);
            series.push((format!("consistency_{axis}{shift}"), agree));
        }
        let count = 2.0 * (CONSISTENCY_MAX_SHIFT + 1) as f64;
        overall.iter_mut().for_each(|o| *o /= count);
        series.push(("consistency".to_string(), overall));
        return Ok(series);
    }
    let max_shift = w.min(h) as f64 / 8.0;
    let mut sum = vec![0.0; b];
    for _ in 0..draws.max(1) {
        let mats: Vec<Affine> = (0..b)
            .map(|_| match metric {
                Metric::EqT => {
                    let m = max_shift.floor() as i64;
                    shift_matrix(rng.random_range(-m..=m) as f64, rng.random_range(-m..=m) as f64, h, w)
                }
                Metric::EqTFrac | Metric::Sample => shift_matrix(
                    rng.random_range(-max_shift..=max_shift),
                    rng.random_range(-max_shift..=max_shift),
                    h,
                    w,
                ),
                Metric::EqR => Transform::Rotate
                    .matrix(rng.random_range(0.0..std::f64::consts::TAU))
                    .unwrap_or(crate::transforms::IDENTITY),
                Metric::Consistency => crate::transforms::IDENTITY,
            })
            .collect();
        let errs = if metric == Metric::Sample {
            // Our finite warp (bilinear, reflection) for a random translation, then a random
            // rotation in ±SAMPLE_MAX_ANGLE; the two errors are averaged.
            let angles: Vec<f64> = (0..b)
                .map(|_| rng.random_range(-SAMPLE_MAX_ANGLE..=SAMPLE_MAX_ANGLE))
                .collect();
            let tr = equivariance_error(f, output, x, &fx, &|v| warp(v, &mats, Padding::Reflect))?;
            let rot = equivariance_error(f, output, x, &fx, &|v| {
                apply(v, Transform::Rotate, &angles, Padding::Reflect)
            })?;
            tr.iter().zip(&rot).map(|(a, r)| (a + r) / 2.0).collect()
        } else {
            equivariance_error(f, output, x, &fx, &|v| lanczos_warp(v, &mats))?
        };
        sum.iter_mut().zip(errs).for_each(|(s, e)| *s += e);
    }
    let n = draws.max(1) as f64;
    Ok(vec![(
        metric.name().to_string(),
        sum.into_iter().map(|s| s / n).collect(),
    )])
}

/// Accumulates metrics of a classifier's probabilities over the batches of a split.
#[derive(Clone, Debug)]
pub struct MetricsAccumulator {
    metrics: Vec<Metric>,
    draws: usize,
    /// Per metric, its named series.
    accs: Vec<Vec<(String, MeanStderr)>>,
}

impl MetricsAccumulator {
    pub fn new(metrics: &[Metric], draws: usize) -> Self {
        Self {
            metrics: metrics.to_vec(),
            draws: draws.max(1),
            accs: vec![Vec::new(); metrics.len()],
        }
    }

    pub fn push(&mut self, model: &dyn Model, x: &Tensor, rng: &mut Rng) -> Result<()> {
        let probs = |x: &Tensor| softmax(&model.forward(x)?);
        for (&metric, accs) in self.metrics.iter().zip(&mut self.accs) {
            for (k, (name, vals)) in metric_per_image(metric, &probs, Output::Invariant, x, self.draws, rng)?
                .into_iter()
                .enumerate()
            {
                if accs.len() <= k {
                    accs.push((name, MeanStderr::new()));
                }
                accs[k].1.extend(vals);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Vec<MetricStat> {
        let draws = self.draws;
        self.metrics
            .into_iter()
            .zip(self.accs)
            .flat_map(|(metric, accs)| {
                accs.into_iter().map(move |(name, stat)| MetricStat {
                    // A per-shift consistency series is one fixed shift; the overall mean is all of them.
                    draws: match metric {
                        Metric::Consistency if name == "consistency" => 2 * (CONSISTENCY_MAX_SHIFT + 1),
                        Metric::Consistency => 1,
                        _ => draws,
                    },
                    name,
                    stat,
                })
            })
            .collect()
    }
}

/// Every metric in `metrics` over `images: (N, C, H, W)` for a classifier's probabilities.
pub fn metrics_split(
    model: &dyn Model,
    images: &Tensor,
    metrics: &[Metric],
    draws: usize,
    batch_size: usize,
    rng: &mut Rng,
) -> Result<Vec<MetricStat>> {
    let n = images.dim(0)?;
    let bs = batch_size.max(1);
    let mut acc = MetricsAccumulator::new(metrics, draws);
    for start in (0..n).step_by(bs) {
        acc.push(model, &images.narrow(0, start, bs.min(n - start))?, rng)?;
    }
    Ok(acc.finish())
}
