//! Alternative metrics (issue 6 item 3): exact invariances of circular convolution nets, zero
//! error for a constant model and the identity map, and the Lanczos resampler's exact cases.

mod common;

use candle_core::{DType, Result, Tensor};
use common::*;
use liederiv::kernels::softmax;
use liederiv::lie::{lanczos_warp, metric_per_image, metrics_split, roll, Metric, Output};
use liederiv::models::Model;
use liederiv::transforms::IDENTITY;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn circular_conv_net_is_consistent_at_every_shift() {
    let mut r = rng(31);
    // No zero border needed: circular shifts commute exactly with circular convolutions.
    let x = randn(&[6, 1, 16, 16], 1.0, DType::F32, &mut r);
    let net = ConvNet::random(&[1, 6, 6], 10, true, DType::F32, 32);
    let stats = metrics_split(&net, &x, &[Metric::Consistency], 1, 4, &mut r).unwrap();
    assert_eq!(stats.len(), 2 * 8 + 1);
    for s in &stats {
        assert_eq!(s.stat.n(), 6);
        assert_eq!(s.stat.mean(), 1.0, "{}", s.name);
    }
    assert_eq!(stats.last().unwrap().draws, 16);
    // A net that is not shift-invariant (linear on pixels) is inconsistent somewhere.
    let lin = LinearModel {
        w: randn(&[10, 256], 1.0, DType::F32, &mut r),
        b: randn(&[10], 0.1, DType::F32, &mut r),
    };
    let stats = metrics_split(&lin, &x, &[Metric::Consistency], 1, 6, &mut r).unwrap();
    assert!(stats.last().unwrap().stat.mean() < 1.0);
}

#[test]
fn integer_shifts_miss_relu_aliasing_that_fractional_shifts_see() {
    let mut r = rng(33);
    // Content stays 4 px from the border, shifts are ≤ 16/8 = 2 px: zero fill equals a roll.
    let x = blob_images(6, 1, 16, 4, DType::F64, &mut r);
    let net = ConvNet::random(&[1, 6, 6], 10, true, DType::F64, 34);
    let probs = |x: &Tensor| -> Result<Tensor> { softmax(&net.forward(x)?) };
    let eq_t = metric_per_image(Metric::EqT, &probs, Output::Invariant, &x, 4, &mut r).unwrap();
    let frac = metric_per_image(Metric::EqTFrac, &probs, Output::Invariant, &x, 4, &mut r).unwrap();
    let eq_r = metric_per_image(Metric::EqR, &probs, Output::Invariant, &x, 4, &mut r).unwrap();
    let sample = metric_per_image(Metric::Sample, &probs, Output::Invariant, &x, 4, &mut r).unwrap();
    let (t, f, rr, s) = (mean(&eq_t[0].1), mean(&frac[0].1), mean(&eq_r[0].1), mean(&sample[0].1));
    println!("eq_t {t:e} eq_t_frac {f:e} eq_r {rr:e} sample {s:e}");
    assert!(t < 1e-24, "integer shifts: {t:e}");
    assert!(f > 1e-10 && rr > 1e-10 && s > 1e-10);
}

#[test]
fn constant_model_and_identity_map_have_zero_error() {
    let mut r = rng(35);
    let x = blob_images(5, 1, 12, 2, DType::F32, &mut r);
    let model = ConstantModel {
        logits: randn(&[4], 1.0, DType::F32, &mut r),
    };
    let stats = metrics_split(&model, &x, &Metric::ALL, 3, 2, &mut r).unwrap();
    for s in &stats {
        let want = if s.name.starts_with("consistency") { 1.0 } else { 0.0 };
        assert_eq!((s.stat.mean(), s.stat.stderr()), (want, 0.0), "{}", s.name);
        assert_eq!(s.stat.n(), 5);
    }
    let sample = stats.iter().find(|s| s.name == "sample").unwrap();
    assert_eq!(sample.draws, 3);
    let identity = |x: &Tensor| -> Result<Tensor> { Ok(x.clone()) };
    for m in [Metric::EqT, Metric::EqTFrac, Metric::EqR, Metric::Sample] {
        let v = metric_per_image(m, &identity, Output::Image, &x, 3, &mut r).unwrap();
        assert!(v[0].1.iter().all(|e| *e == 0.0), "{}", m.name());
    }
}

#[test]
fn lanczos_is_exact_on_grid_points() {
    let mut r = rng(36);
    let x = randn(&[2, 3, 9, 11], 1.0, DType::F64, &mut r);
    assert!(max_abs(&(lanczos_warp(&x, &[IDENTITY]).unwrap() - &x).unwrap()) < 1e-15);
    // A shift by exactly 2 columns (u step 2/(W−1) per pixel) is an exact zero-filled shift.
    let m = [[1.0, 0.0, -4.0 / 10.0], [0.0, 1.0, 0.0]];
    let shifted = lanczos_warp(&x, &[m]).unwrap();
    let want = Tensor::cat(
        &[
            Tensor::zeros((2, 3, 9, 2), DType::F64, x.device()).unwrap(),
            x.narrow(3, 0, 9).unwrap(),
        ],
        3,
    )
    .unwrap();
    assert!(max_abs(&(shifted - want).unwrap()) < 1e-14);
    // roll round trip.
    let back = roll(&roll(&x, 3, 5).unwrap(), 11 - 3, 9 - 5).unwrap();
    assert_eq!(max_abs(&(back - &x).unwrap()), 0.0);
}

#[test]
fn lanczos_half_pixel_shift_of_a_smooth_signal_is_accurate() {
    // A low-frequency cosine along x (period 16 px) away from the borders.
    let (h, w) = (8, 40);
    let f = |j: f64| (2.0 * std::f64::consts::PI * j / 16.0).cos();
    let v: Vec<f64> = (0..h * w).map(|p| f((p % w) as f64)).collect();
    let x = Tensor::from_vec(v, (1, 1, h, w), &candle_core::Device::Cpu).unwrap();
    let m = [[1.0, 0.0, 2.0 * 0.5 / (w - 1) as f64], [0.0, 1.0, 0.0]]; // sample at j + 0.5
    let y: Vec<f64> = lanczos_warp(&x, &[m])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = (3..w - 4).map(|j| (y[j] - f(j as f64 + 0.5)).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-2, "{worst:e}");
}
