//! From a split to model input: seeded epoch order, and batches normalized with
//! `(x − data.mean) / data.std`, resized bicubically to `data.image_size` and replicated to
//! three channels for RGB checkpoints.
//!
//! The resize is separable: `Y = R·X·Rᵀ` with R the (S, 28) matrix of Keys' cubic convolution
//! (a = −0.5, PIL's bicubic), pixel centres aligned (`align_corners=False`), border taps
//! clamped — exactly what a tensor upsampling by interpolation does, as two matmuls on the
//! batch's device. Keys' kernel reproduces linear (and quadratic) images exactly away from the
//! border, which the tests check.

use super::Split;
use crate::config::DataConfig;
use candle_core::{DType, Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
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

/// Images `indices` of `split` as (B, data.channels, S, S) f32 with S = data.image_size,
/// normalized; labels (B,) u32.
pub fn batch(split: &Split, indices: &[usize], data: &DataConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let (h, w) = (split.h, split.w);
    let hw = h * w;
    let mut pixels = Vec::with_capacity(indices.len() * hw);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        if i >= split.len() {
            candle_core::bail!(
                "batch: index {i} out of range for split {} of {} images",
                split.name,
                split.len()
            );
        }
        pixels.extend_from_slice(&split.images[i * hw..(i + 1) * hw]);
        labels.push(split.labels[i] as u32);
    }
    let b = indices.len();
    // (B·h·w) -> (B, 1, h, w)
    let mut x = Tensor::from_vec(pixels, (b, 1, h, w), device)?;
    let s = data.image_size;
    if (s, s) != (h, w) {
        let rows = Tensor::from_vec(bicubic_matrix(s, h), (s, h), device)?.to_dtype(DType::F32)?;
        let cols = Tensor::from_vec(bicubic_matrix(s, w), (s, w), device)?.to_dtype(DType::F32)?;
        // (S, h) · (B, 1, h, w) -> (B, 1, S, w); · (w, S) -> (B, 1, S, S)
        x = rows.broadcast_matmul(&x)?.broadcast_matmul(&cols.t()?)?;
    }
    x = ((x - data.mean)? / data.std)?;
    if data.channels == 3 {
        // (B, 1, S, S) -> (B, 3, S, S)
        x = x.repeat((1, 3, 1, 1))?;
    }
    let y = Tensor::from_vec(labels, b, device)?;
    Ok((x, y))
}
