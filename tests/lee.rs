//! LEE engine tests (issue 3): analytic cases on small test-local models, the softmax JVP against
//! an f64 finite difference, one-pass vs one-by-one transforms, the statistics, the accumulator,
//! and the gradient of the differentiable penalty.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::*;
use liederiv::lie::{
    lee_penalty, lee_per_image, lee_split, output_lie_derivative, LeeOutput, LeeSpec, MeanStderr, Statistic,
};
use liederiv::models::Model;
use liederiv::transforms::{apply, image_lie_derivative, Padding, Stencil, Transform};

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// LEE of the logits relative to the logits' spread over images: comparable across models.
fn relative_logit_lee(m: &dyn Model, x: &Tensor, tr: Transform) -> f64 {
    let lee = mean(&lee_per_image(m, x, &[tr], Stencil::Central, Statistic::Sq, LeeOutput::Logits).unwrap()[0]);
    let logits = m.forward(x).unwrap();
    let var = logits
        .broadcast_sub(&logits.mean_keepdim(0).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    lee / var.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn disk_average_is_near_rotation_invariant() {
    let mut r = rng(1);
    let x = blob_images_width(16, 1, 28, 3, (2.5, 4.0), DType::F64, &mut r);
    let disk = DiskModel::new(28, 10, DType::F64, 2);
    let conv = ConvNet::random(&[1, 8, 8], 10, true, DType::F64, 3);
    let (d, c) = (
        relative_logit_lee(&disk, &x, Transform::Rotate),
        relative_logit_lee(&conv, &x, Transform::Rotate),
    );
    // Both translate: the disk is not translation-invariant, so its rotate number is not trivially 0.
    let dt = relative_logit_lee(&disk, &x, Transform::TranslateX);
    println!("relative rotate LEE: disk {d:.3e}, random conv {c:.3e}; disk translate_x {dt:.3e}");
    assert!(d < c * 1e-2, "disk {d:e} is not orders of magnitude below conv {c:e}");
    assert!(d < dt * 1e-2, "disk rotate {d:e} vs translate {dt:e}");
}

#[test]
fn circular_convolution_has_zero_translate_lee() {
    let mut r = rng(4);
    let x = blob_images(4, 2, 16, 4, DType::F64, &mut r);
    // Linear circular convolutions, global pool, head: exactly translation-invariant.
    let net = ConvNet::random(&[2, 4, 3], 5, false, DType::F64, 5);
    // The same net with ReLUs aliases: its translate LEE is not zero (the test can fail).
    let relu = ConvNet {
        relu: true,
        ..ConvNet::random(&[2, 4, 3], 5, false, DType::F64, 5)
    };
    let trs = [Transform::TranslateX, Transform::TranslateY];
    let lee = lee_per_image(&net, &x, &trs, Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
    let aliased = lee_per_image(&relu, &x, &trs, Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
    let (tx, ty, ax) = (mean(&lee[0]), mean(&lee[1]), mean(&aliased[0]));
    println!("circular conv: translate_x {tx:e} translate_y {ty:e}; with ReLU {ax:e}");
    assert!(tx < 1e-28 && ty < 1e-28, "translate LEE {tx:e} {ty:e}");
    assert!(ax > 1e-12, "with ReLU: {ax:e}");
}

#[test]
fn linear_model_lie_derivative_is_w_times_input_tangent() {
    let mut r = rng(6);
    let x = blob_images(3, 1, 12, 2, DType::F64, &mut r);
    let w = randn(&[7, 144], 0.3, DType::F64, &mut r);
    let b = randn(&[7], 0.1, DType::F64, &mut r);
    let model = LinearModel { w: w.clone(), b };
    let trs = [
        Transform::TranslateX,
        Transform::ShearY,
        Transform::StretchX,
        Transform::Rotate,
    ];
    let d = output_lie_derivative(&model, &x, &trs, Stencil::Central, LeeOutput::Logits)
        .unwrap()
        .d;
    for (i, &tr) in trs.iter().enumerate() {
        let lx = image_lie_derivative(&x, tr, Stencil::Central)
            .unwrap()
            .flatten_from(1)
            .unwrap();
        let want = lx.matmul(&w.t().unwrap()).unwrap();
        let err = max_abs(&(d.get(i).unwrap() - &want).unwrap());
        assert!(err < 1e-12 * max_abs(&want), "{tr}: {err:e}");
        // For translations, shears and stretches the central stencil is the exact symmetric
        // derivative of the bilinear warp: an oracle independent of the stencil code.
        if tr != Transform::Rotate {
            let eps = 1e-3;
            let fp = model
                .forward(&apply(&x, tr, &[eps], Padding::Reflect).unwrap())
                .unwrap();
            let fm = model
                .forward(&apply(&x, tr, &[-eps], Padding::Reflect).unwrap())
                .unwrap();
            let fd = ((fp - fm).unwrap() / (2.0 * eps)).unwrap();
            let err = max_abs(&(d.get(i).unwrap() - &fd).unwrap());
            assert!(err < 1e-9 * max_abs(&fd), "{tr}: finite warp difference {err:e}");
        }
    }
}

#[test]
fn probability_tangent_matches_f64_finite_difference() {
    let mut r = rng(7);
    let x = blob_images(4, 1, 14, 2, DType::F64, &mut r);
    let net = ConvNet::random(&[1, 6, 6], 10, true, DType::F64, 8);
    let trs = [Transform::Rotate, Transform::Scale, Transform::Saturate];
    let dp = output_lie_derivative(&net, &x, &trs, Stencil::Central, LeeOutput::Probs)
        .unwrap()
        .d;
    let probs = |x: &Tensor| candle_nn::ops::softmax_last_dim(&net.forward(x).unwrap()).unwrap();
    for (i, &tr) in trs.iter().enumerate() {
        let v = image_lie_derivative(&x, tr, Stencil::Central).unwrap();
        let h = 1e-5;
        let fd = ((probs(&(&x + (&v * h).unwrap()).unwrap()) - probs(&(&x - (&v * h).unwrap()).unwrap())).unwrap()
            / (2.0 * h))
            .unwrap();
        let rel = max_abs(&(dp.get(i).unwrap() - &fd).unwrap()) / max_abs(&fd);
        assert!(rel < 1e-7, "{tr}: relative error {rel:e}");
    }
}

#[test]
fn one_pass_equals_each_transform_alone_and_statistics_agree() {
    let mut r = rng(9);
    let x = blob_images(5, 1, 14, 2, DType::F32, &mut r);
    let net = ConvNet::random(&[1, 6], 10, true, DType::F32, 10);
    let trs = [Transform::Rotate, Transform::TranslateX, Transform::Hyperbolic];
    let all = lee_per_image(&net, &x, &trs, Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
    let d = output_lie_derivative(&net, &x, &trs, Stencil::Central, LeeOutput::Probs)
        .unwrap()
        .d;
    let abs = lee_per_image(&net, &x, &trs, Stencil::Central, Statistic::Abs, LeeOutput::Probs).unwrap();
    let logit = lee_per_image(&net, &x, &trs, Stencil::Central, Statistic::Sq, LeeOutput::Logits).unwrap();
    for (i, &tr) in trs.iter().enumerate() {
        let alone = lee_per_image(&net, &x, &[tr], Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
        let d64: Vec<Vec<f64>> = d.get(i).unwrap().to_dtype(DType::F64).unwrap().to_vec2().unwrap();
        for b in 0..5 {
            assert!((all[i][b] - alone[0][b]).abs() <= 1e-6 * alone[0][b], "{tr} image {b}");
            let sq = d64[b].iter().map(|v| v * v).sum::<f64>() / 10.0;
            let ab = d64[b].iter().map(|v| v.abs()).sum::<f64>() / 10.0;
            assert!((all[i][b] - sq).abs() <= 1e-6 * sq);
            assert!((abs[i][b] - ab).abs() <= 1e-6 * ab);
            // Probabilities are squashed: softmax's Jacobian has norm ≤ 1/2.
            assert!(all[i][b] <= logit[i][b] / 4.0 + 1e-12);
        }
    }
}

#[test]
fn a_saturation_invariant_model_has_zero_saturation_lee() {
    // The model's JVP is computed (not zeros), so this fails if the saturate tangent, the output
    // derivative or the statistic is wrong; the other transforms show the model is not trivial.
    let mut r = rng(11);
    let x = blob_images(3, 1, 10, 1, DType::F64, &mut r);
    let model = ScaleInvariantModel {
        weight: randn(&[4, 100], 1.0, DType::F64, &mut r),
    };
    let lee = lee_per_image(
        &model,
        &x,
        &Transform::ALL,
        Stencil::Central,
        Statistic::Sq,
        LeeOutput::Logits,
    )
    .unwrap();
    for (t, per_image) in Transform::ALL.iter().zip(&lee) {
        for v in per_image {
            if *t == Transform::Saturate {
                assert!(*v < 1e-28, "{t}: {v:e}");
            } else {
                assert!(*v > 1e-6, "{t}: {v:e} (the model should not be invariant to it)");
            }
        }
    }
}

#[test]
fn mean_stderr_matches_direct_formula() {
    let v = [1.0, 4.0, 2.5, -3.0, 7.25, 0.5];
    let mut acc = MeanStderr::new();
    acc.extend(v);
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0);
    assert_eq!(acc.n(), 6);
    assert!((acc.mean() - m).abs() < 1e-14);
    assert!((acc.stderr() - (var / n).sqrt()).abs() < 1e-14);
    let mut one = MeanStderr::new();
    one.push(3.0);
    assert_eq!((one.mean(), one.stderr()), (3.0, 0.0));
}

#[test]
fn split_summary_batches_and_counts_accuracy() {
    let mut r = rng(12);
    let x = blob_images(10, 1, 12, 2, DType::F32, &mut r);
    let net = ConvNet::random(&[1, 4], 3, true, DType::F32, 13);
    let pred = net.forward(&x).unwrap().argmax(D::Minus1).unwrap();
    // Labels: the prediction for the first 7 images, something else for the last 3.
    let mut labels: Vec<u32> = pred.to_vec1().unwrap();
    for l in labels.iter_mut().skip(7) {
        *l = (*l + 1) % 3;
    }
    let labels = Tensor::new(labels, &Device::Cpu).unwrap();
    let trs = vec![Transform::Rotate, Transform::Scale];
    let spec = LeeSpec {
        transforms: trs.clone(),
        stencil: Stencil::Central,
        statistic: Statistic::Sq,
        output: LeeOutput::Probs,
        batch_size: 4,
    };
    let s = lee_split(&net, &x, Some(&labels), &spec).unwrap();
    assert_eq!(s.n, 10);
    assert!((s.accuracy.unwrap() - 0.7).abs() < 1e-12);
    let whole = lee_per_image(&net, &x, &trs, Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
    for (i, (t, acc)) in s.lee.iter().enumerate() {
        assert_eq!(*t, trs[i]);
        assert_eq!(acc.n(), 10);
        assert!((acc.mean() - mean(&whole[i])).abs() <= 1e-5 * acc.mean());
    }
}

#[test]
fn lee_penalty_gradient_matches_finite_difference() {
    let mut r = rng(14);
    let x = blob_images(3, 1, 10, 2, DType::F64, &mut r);
    let net = ConvNet::random(&[1, 3], 4, true, DType::F64, 15);
    let trs = [Transform::Rotate, Transform::TranslateX];
    let loss = lee_penalty(&net, &x, &trs, Stencil::Central, LeeOutput::Probs).unwrap();
    let grads = loss.backward().unwrap();
    for var in net.vars() {
        let g = grads.get(var.as_tensor()).expect("every weight gets a gradient");
        assert!(max_abs(g) > 0.0);
    }
    // Directional derivative along a random direction of the first conv weight.
    let w = net.convs[0].0.clone();
    let g = grads.get(w.as_tensor()).unwrap().clone();
    let dir = randn(w.dims(), 1.0, DType::F64, &mut r);
    let analytic = (&g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let w0 = w.as_tensor().copy().unwrap();
    let h = 1e-5;
    let eval = |s: f64| {
        w.set(&(&w0 + (&dir * s).unwrap()).unwrap()).unwrap();
        lee_penalty(&net, &x, &trs, Stencil::Central, LeeOutput::Probs)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let fd = (eval(h) - eval(-h)) / (2.0 * h);
    assert!(
        (analytic - fd).abs() < 1e-6 * fd.abs(),
        "analytic {analytic:e} fd {fd:e}"
    );
}
