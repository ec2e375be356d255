//! From a split to model input: seeded epoch order, and batches. Digits are normalized with
//! `(x − data.mean) / data.std`, resized bicubically to `data.image_size` and replicated to
//! three channels for RGB checkpoints; photos are decoded and preprocessed as timm does
//! ([`super::photos`]).
//!
//! The digits' resize is separable: `Y = R·X·Rᵀ` with R the (S, 28) matrix of Keys' cubic convolution
//! (a = −0.5, PIL's bicubic), pixel centres aligned (`align_corners=False`), border taps
//! clamped — exactly what a tensor upsampling by interpolation does, as two matmuls on the
//! batch's device. Keys' kernel reproduces linear (and quadratic) images exactly away from the
//! border, which the tests check.

use super::photos::{self, Crop};
use super::{Images, Split};
use crate::config::{AugmentConfig, DataConfig};
use crate::transforms::{apply, Padding, Transform};
use candle_core::{DType, Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded permutation of 0..n: the same (seed, epoch) gives the same order, each epoch its
/// own (ChaCha8 stream = epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rng);
    v
}

/// Keys' cubic convolution kernel with a = −0.5.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The (n_out, n_in) bicubic resampling matrix: row i holds the weights of the input pixels
/// for output pixel i (centre at (i + ½)·n_in/n_out − ½, taps clamped to the border).
fn bicubic_matrix(n_out: usize, n_in: usize) -> Vec<f64> {
    let mut m = vec![0.0; n_out * n_in];
    let scale = n_in as f64 / n_out as f64;
    for i in 0..n_out {
        let c = (i as f64 + 0.5) * scale - 0.5;
        let f = c.floor();
        for k in -1..=2 {
            let tap = f + k as f64;
            let j = tap.clamp(0.0, (n_in - 1) as f64) as usize;
            m[i * n_in + j] += cubic(c - tap);
        }
    }
    m
}

/// Images `indices` of `split` as (B, data.channels, S, S) f32, normalised as for evaluation
/// (photos: timm's resize and centre crop); labels (B,) u32.
pub fn batch(split: &Split, indices: &[usize], data: &DataConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let x = match &split.images {
        Images::Grey { pixels, h, w } => grey(pixels, (*h, *w), &split.name, indices, data, device)?,
        Images::Photos(p) => {
            check(split, indices)?;
            photos::batch(p, indices, data, Crop::Eval, device)?
        }
    };
    Ok((x, labels(split, indices, device)?))
}

/// A training batch: as [`batch`], except that photos get `augment`'s random resized crop and
/// flip, drawn from one `rng` draw per batch (digits draw nothing: their augmentation is the
/// trainer's, on tensors).
pub fn train_batch(
    split: &Split,
    indices: &[usize],
    data: &DataConfig,
    augment: &AugmentConfig,
    device: &Device,
    rng: &mut impl Rng,
) -> Result<(Tensor, Tensor)> {
    let Images::Photos(p) = &split.images else {
        return batch(split, indices, data, device);
    };
    check(split, indices)?;
    let crop = Crop::Train {
        augment,
        seed: rng.random(),
    };
    Ok((
        photos::batch(p, indices, data, crop, device)?,
        labels(split, indices, device)?,
    ))
}

/// [`batch`] with every image rotated by `degrees` about its centre, black outside the frame:
/// digits before resizing (the MNIST-rot warp on the 28-px image), photos after preprocessing
/// (the normalised tensor, filled with data.blank()).
pub fn rotated_batch(
    split: &Split,
    indices: &[usize],
    degrees: f64,
    data: &DataConfig,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let theta = degrees.to_radians();
    let Images::Grey { pixels, h, w } = &split.images else {
        let (x, y) = batch(split, indices, data, device)?;
        let b = x.dim(0)?;
        let rot = |x: &Tensor| apply(x, Transform::Rotate, &vec![theta; b], Padding::Zeros);
        return Ok((data.blank().around(&x, rot)?, y));
    };
    let hw = h * w;
    check(split, indices)?;
    let picked: Vec<f32> = indices
        .iter()
        .flat_map(|&i| pixels[i * hw..(i + 1) * hw].iter().copied())
        .collect();
    let rotated = super::rotate_images(&picked, *h, *w, &vec![theta; indices.len()])?;
    let all: Vec<usize> = (0..indices.len()).collect();
    Ok((
        grey(&rotated, (*h, *w), &split.name, &all, data, device)?,
        labels(split, indices, device)?,
    ))
}

/// Every index in range.
fn check(split: &Split, indices: &[usize]) -> Result<()> {
    match indices.iter().find(|&&i| i >= split.len()) {
        Some(i) => candle_core::bail!(
            "batch: index {i} out of range for split {} of {} images",
            split.name,
            split.len()
        ),
        None => Ok(()),
    }
}

fn labels(split: &Split, indices: &[usize], device: &Device) -> Result<Tensor> {
    let labels: Vec<u32> = indices.iter().map(|&i| split.labels[i]).collect();
    Tensor::from_vec(labels, indices.len(), device)
}

/// Grey images `indices` of `pixels` (n·h·w in [0, 1]) resized to data.image_size, normalised,
/// replicated to data.channels.
fn grey(
    pixels: &[f32],
    (h, w): (usize, usize),
    name: &str,
    indices: &[usize],
    data: &DataConfig,
    device: &Device,
) -> Result<Tensor> {
    let hw = h * w;
    let n = pixels.len() / hw.max(1);
    let mut picked = Vec::with_capacity(indices.len() * hw);
    for &i in indices {
        if i >= n {
            candle_core::bail!("batch: index {i} out of range for split {name} of {n} images");
        }
        picked.extend_from_slice(&pixels[i * hw..(i + 1) * hw]);
    }
    let b = indices.len();
    // (B·h·w) -> (B, 1, h, w)
    let mut x = Tensor::from_vec(picked, (b, 1, h, w), device)?;
    let s = data.image_size;
    if (s, s) != (h, w) {
        let rows = Tensor::from_vec(bicubic_matrix(s, h), (s, h), device)?.to_dtype(DType::F32)?;
        let cols = Tensor::from_vec(bicubic_matrix(s, w), (s, w), device)?.to_dtype(DType::F32)?;
        // (S, h) · (B, 1, h, w) -> (B, 1, S, w); · (w, S) -> (B, 1, S, S)
        x = rows.broadcast_matmul(&x)?.broadcast_matmul(&cols.t()?)?;
    }
    if data.channels == 3 {
        // (B, 1, S, S) -> (B, 3, S, S)
        x = x.repeat((1, 3, 1, 1))?;
    }
    match (data.mean.0.as_slice(), data.std.0.as_slice()) {
        ([m], [sd]) => (x - *m)? / *sd,
        _ => {
            let per = |v: &crate::config::PerChannel| {
                let vs: Vec<f32> = (0..data.channels).map(|c| v.get(c) as f32).collect();
                Tensor::from_vec(vs, (1, data.channels, 1, 1), device)
            };
            x.broadcast_sub(&per(&data.mean)?)?.broadcast_div(&per(&data.std)?)
        }
    }
}
