//! Invariance by averaging (`model.average_rotations`, `models::averaged`): exact C4 invariance
//! of the averaged logits under an index-permutation rot90 (independent of the warp the wrapper
//! uses), and its JVP against f64 central differences.

mod common;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::max_abs;
use liederiv::config::Config;
use liederiv::jvp::Tape;
use liederiv::models::build_with;

fn cfg(extra: &[&str]) -> Config {
    common::tiny_vit_config(16, extra)
}

/// rot90 of `(B, C, H, W)` by index permutation: transpose the grid, then reverse the rows.
fn rot90(x: &Tensor) -> Tensor {
    let h = x.dim(2).unwrap();
    let rev = Tensor::from_vec((0..h as u32).rev().collect::<Vec<_>>(), h, x.device()).unwrap();
    x.transpose(2, 3)
        .unwrap()
        .contiguous()
        .unwrap()
        .index_select(&rev, 2)
        .unwrap()
}

#[test]
fn c4_averaged_logits_are_invariant_under_rot90() {
    for kind in ["vit", "cnn"] {
        let kind_set = format!("model.kind={kind:?}");
        let c = cfg(&[&kind_set, "model.average_rotations=4", "model.cnn.widths=[4, 8]"]);
        let vm = VarMap::new();
        let model = build_with(&c, &vm, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &Device::Cpu).unwrap();
        let y = model.forward(&x).unwrap();
        let mut r = x.clone();
        for k in 1..4 {
            r = rot90(&r);
            let d = max_abs(&(model.forward(&r).unwrap() - &y).unwrap());
            assert!(d < 1e-5 * max_abs(&y).max(1.0), "{kind}: rot90^{k}: {d:e}");
        }
        // The unaveraged model is not invariant: the check can fail.
        let plain = build_with(
            &cfg(&[&kind_set, "model.cnn.widths=[4, 8]"]),
            &vm,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let d = max_abs(&(plain.forward(&rot90(&x)).unwrap() - plain.forward(&x).unwrap()).unwrap());
        assert!(d > 1e-3, "{kind}: the plain model looks invariant ({d:e})");
    }
}

#[test]
fn averaged_jvp_matches_f64_central_differences() {
    let c = cfg(&["model.average_rotations=8"]);
    let vm = VarMap::new();
    let model = build_with(&c, &vm, DType::F64, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f64, 1.0, (2, 1, 28, 28), &Device::Cpu).unwrap();
    let v = Tensor::randn(0f64, 1.0, (2, 2, 1, 28, 28), &Device::Cpu).unwrap();
    let (y, dy) = model.jvp(&x, &v, &mut Tape::off()).unwrap();
    assert!(max_abs(&(&y - model.forward(&x).unwrap()).unwrap()) < 1e-12);
    let h = 1e-5;
    for t in 0..2 {
        let vt = v.get(t).unwrap();
        let fd = ((model.forward(&(&x + (&vt * h).unwrap()).unwrap()).unwrap()
            - model.forward(&(&x - (&vt * h).unwrap()).unwrap()).unwrap())
        .unwrap()
            / (2.0 * h))
            .unwrap();
        let rel = max_abs(&(dy.get(t).unwrap() - &fd).unwrap()) / max_abs(&fd);
        assert!(rel < 1e-6, "tangent {t}: relative error {rel:e}");
    }
    // The layerwise decomposition refuses it with a reason rather than mis-attributing.
    let mut tape = Tape::layerwise(
        liederiv::transforms::Transform::Rotate,
        liederiv::transforms::Stencil::Central,
    );
    let err = model
        .jvp(&x, &v.narrow(0, 0, 1).unwrap(), &mut tape)
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("average_rotations")));
}

#[test]
fn a_c4_models_angle_curve_repeats_every_90_degrees() {
    // Synthetic digits in [0, 1] with labels; the C4-averaged ViT's error and true-class
    // probability at 0°, 90°, 180°, 270° agree; the plain model's do not.
    let dev = Device::Cpu;
    let n = 32;
    let images: Vec<f32> = Tensor::rand(0f32, 1.0, (n * 784,), &dev).unwrap().to_vec1().unwrap();
    let split = liederiv::data::Split {
        name: "test".into(),
        images,
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        h: 28,
        w: 28,
    };
    let degrees = [0.0, 90.0, 180.0, 270.0, 45.0];
    let curve = |c: &Config, vm: &VarMap| {
        let model = build_with(c, vm, DType::F32, &dev).unwrap();
        liederiv::train::evaluate::angle_curve(model.as_ref(), c, &split, 0, &degrees, &dev).unwrap()
    };
    let vm = VarMap::new();
    let avg = curve(&cfg(&["model.average_rotations=4"]), &vm);
    for p in &avg[1..4] {
        assert_eq!(p.error, avg[0].error, "{}°", p.degrees);
        assert!(
            (p.true_prob - avg[0].true_prob).abs() < 1e-6,
            "{}°: {} vs {}",
            p.degrees,
            p.true_prob,
            avg[0].true_prob
        );
    }
    let plain = curve(&cfg(&[]), &vm);
    let spread = plain[..4]
        .iter()
        .map(|p| (p.true_prob - plain[0].true_prob).abs())
        .fold(0.0, f64::max);
    assert!(spread > 1e-4, "the plain model's curve is flat too ({spread:e})");
}
