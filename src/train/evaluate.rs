//! Evaluation (MAE's `engine_finetune.evaluate`): loss and accuracy on the configured splits, and
//! LEE per transform on a fixed subset of each LEE split — the first `lee.limit` images, the same
//! ones every time, so curves over training are comparable. Eval mode only (no RNG is consumed,
//! which keeps a resumed run bit-identical).

use crate::config::Config;
use crate::data::Split;
use crate::lie::{
    decompose, lee_split, GroupAccumulator, GroupReport, LayerwiseAccumulator, LayerwiseReport, LeeAccumulator,
    LeeSpec, LeeSummary, Metric, MetricStat, MetricsAccumulator,
};
use crate::models::{Model, Rng};
use crate::report::{MeanStderr, SplitMetrics};
use candle_core::{DType, Device, Result, Tensor, D};
use std::collections::BTreeMap;

/// Mean cross-entropy against soft targets: `logits (B, K)`, `targets (B, K)` rows summing to 1.
/// Written from differentiable ops (the max shift is detached; it cancels in the value).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_p = shifted.broadcast_sub(&log_z)?; // (B, K)
    (targets * log_p)?.sum(D::Minus1)?.neg()?.mean_all()
}

/// `n = min(limit, len)` images of `split` (limit 0 = all), normalised, `(n, C, S, S)`, and
/// their labels `(n,)` u32.
pub fn head_of(split: &Split, limit: usize, cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let n = if limit == 0 {
        split.len()
    } else {
        limit.min(split.len())
    };
    let idx: Vec<usize> = (0..n).collect();
    crate::data::batch(split, &idx, &cfg.data, device)
}

/// Eval-mode logits `(n, K)` and labels `(n,)` of the first `limit` images (0 = all), in
/// batches of `eval.batch_size`.
pub fn logits_of(
    model: &dyn Model,
    split: &Split,
    limit: usize,
    cfg: &Config,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = if limit == 0 {
        split.len()
    } else {
        limit.min(split.len())
    };
    logits_by(model, &split.name, n, cfg.eval.batch_size, |idx| {
        crate::data::batch(split, idx, &cfg.data, device)
    })
}

/// Eval-mode logits and labels of images `0..n` of the split `name`, `bs` at a time, each batch
/// made by `load(indices)`.
fn logits_by(
    model: &dyn Model,
    name: &str,
    n: usize,
    bs: usize,
    load: impl Fn(&[usize]) -> Result<(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)> {
    let bs = bs.max(1);
    let mut logits = Vec::new();
    let mut labels = Vec::new();
    for start in (0..n).step_by(bs) {
        let idx: Vec<usize> = (start..(start + bs).min(n)).collect();
        let (x, y) = load(&idx)?;
        // Detached: each batch's logits would otherwise keep the whole forward graph (every
        // activation) alive until the concat is dropped; on the 50k test set that is ~20 GB for
        // the tiny ViT, and the final evaluation of a run was OOM-killed.
        logits.push(model.forward(&x)?.detach());
        labels.push(y);
    }
    if logits.is_empty() {
        candle_core::bail!("split {name} has no images to evaluate");
    }
    Ok((Tensor::cat(&logits, 0)?, Tensor::cat(&labels, 0)?))
}

/// Mean cross-entropy (nats) and top-1 accuracy of `logits (n, K)` against `labels (n,)`.
pub fn loss_accuracy(logits: &Tensor, labels: &Tensor) -> Result<(f64, f64)> {
    let (n, k) = logits.dims2()?;
    let labels = labels.to_dtype(DType::U32)?;
    let onehot = Tensor::from_vec(
        labels
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|&l| (0..k as u32).map(move |c| f32::from(c == l)))
            .collect::<Vec<_>>(),
        (n, k),
        logits.device(),
    )?;
    let loss = cross_entropy(&logits.to_dtype(DType::F32)?, &onehot)?.to_scalar::<f32>()? as f64;
    let correct = logits
        .argmax(D::Minus1)?
        .eq(&labels)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok((loss, correct as f64 / n as f64))
}

/// Loss / accuracy on `acc_splits` (first `acc_limit` images, 0 = all) and LEE on `lee_splits`
/// (first `lee.limit` images). `splits` holds every split named in either list.
// The split lists differ between `train` (eval.splits / lee.splits) and `eval` (--splits), so
// they are passed rather than read from the config.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn Model,
    cfg: &Config,
    splits: &BTreeMap<String, Split>,
    acc_splits: &[String],
    lee_splits: &[String],
    acc_limit: usize,
    spec: &LeeSpec,
    device: &Device,
) -> Result<BTreeMap<String, SplitMetrics>> {
    let get = |name: &String| {
        splits
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("evaluate: split {name:?} was not loaded")))
    };
    let mut out: BTreeMap<String, SplitMetrics> = BTreeMap::new();
    for name in acc_splits {
        let (logits, labels) = logits_of(model, get(name)?, acc_limit, cfg, device)?;
        let (loss, acc) = loss_accuracy(&logits, &labels)?;
        let m = out.entry(name.clone()).or_default();
        m.n = labels.dim(0)?;
        m.loss = Some(loss);
        m.accuracy = Some(acc);
    }
    for name in lee_splits {
        let (x, _) = head_of(get(name)?, cfg.lee.limit, cfg, device)?;
        let summary = lee_split(model, &x, None, spec)?;
        let m = out.entry(name.clone()).or_default();
        for e in summary.entries() {
            let v = MeanStderr {
                mean: e.mean,
                stderr: e.stderr,
                n: e.n,
            };
            m.lee.insert(e.name, v);
        }
    }
    Ok(out)
}

/// What [`measure_split`] measured on one split.
pub struct SplitMeasurement {
    pub lee: LeeSummary,
    pub metrics: Vec<MetricStat>,
    /// The hidden-layer C_N equivariance errors, when asked for.
    pub group: Option<GroupReport>,
    /// One report per transform when the layerwise decomposition was asked for, else none.
    pub layerwise: Vec<LayerwiseReport>,
}

/// What [`measure_split`] measures beside the LEE.
#[derive(Clone, Debug, Default)]
pub struct Extras {
    /// The alternative metrics of `lie::metrics`.
    pub metrics: Vec<Metric>,
    /// The layerwise decomposition of every transform (paper Eq. 6).
    pub layerwise: bool,
    /// The hidden-layer C_N equivariance errors of `lie::group`.
    pub group: bool,
}

/// LEE (and accuracy) on the first `limit` images of `split` (0 = all), in batches of
/// `spec.batch_size`, plus what `extras` asks for. Forward mode only: `model` may be frozen.
#[allow(clippy::too_many_arguments)]
pub fn measure_split(
    model: &dyn Model,
    cfg: &Config,
    split: &Split,
    spec: &LeeSpec,
    limit: usize,
    extras: &Extras,
    device: &Device,
    rng: &mut Rng,
) -> Result<SplitMeasurement> {
    let metrics = &extras.metrics;
    let n = if limit == 0 {
        split.len()
    } else {
        limit.min(split.len())
    };
    let mut lee = LeeAccumulator::new(spec);
    let mut extra = MetricsAccumulator::new(metrics, cfg.lee.metric_draws);
    let mut group = extras.group.then(|| GroupAccumulator::new(cfg.data.blank()));
    let mut lw: Vec<LayerwiseAccumulator> = match extras.layerwise {
        true => spec
            .transforms
            .iter()
            .map(|&t| LayerwiseAccumulator::new(t, cfg.lee.layerwise_probes))
            .collect(),
        false => Vec::new(),
    };
    let bs = spec.batch_size.max(1);
    for start in (0..n).step_by(bs) {
        let idx: Vec<usize> = (start..n.min(start + bs)).collect();
        let (x, y) = crate::data::batch(split, &idx, &cfg.data, device)?;
        lee.push(model, &x, Some(&y), spec)?;
        if !metrics.is_empty() {
            extra.push(model, &x, rng)?;
        }
        if let Some(g) = &mut group {
            g.push(model, &x)?;
        }
        for acc in &mut lw {
            let d = decompose(model, &x, acc.transform(), spec.stencil, spec.output)?;
            acc.push(&d, rng)?;
        }
    }
    Ok(SplitMeasurement {
        lee: lee.finish(),
        metrics: extra.finish(),
        group: group.map(GroupAccumulator::finish),
        layerwise: lw.into_iter().map(|a| a.finish()).collect(),
    })
}

/// Error and mean true-class probability of `model` on the first `limit` images of `split`
/// (0 = all), each rotated by a further `degrees[i]` about its centre (bilinear, black outside
/// the frame: `data::rotated_batch`), one point per angle.
pub fn angle_curve(
    model: &dyn Model,
    cfg: &Config,
    split: &Split,
    limit: usize,
    degrees: &[f64],
    device: &Device,
) -> Result<Vec<crate::report::angles::AnglePoint>> {
    let n = if limit == 0 {
        split.len()
    } else {
        limit.min(split.len())
    };
    let mut out = Vec::with_capacity(degrees.len());
    for &deg in degrees {
        let (logits, labels) = logits_by(model, &split.name, n, cfg.eval.batch_size, |idx| {
            crate::data::rotated_batch(split, idx, deg, &cfg.data, device)
        })?;
        let (_, accuracy) = loss_accuracy(&logits, &labels)?;
        let p = crate::kernels::softmax(&logits.to_dtype(DType::F64)?)?;
        let true_p = p
            .gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
            .mean_all()?
            .to_scalar::<f64>()?;
        out.push(crate::report::angles::AnglePoint {
            split: split.name.clone(),
            degrees: deg,
            n,
            error: 1.0 - accuracy,
            true_prob: true_p,
        });
    }
    Ok(out)
}
