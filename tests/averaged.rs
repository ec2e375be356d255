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
    // probability at θ and θ + 90° agree at every angle of a 15° grid (45° included, where the
    // rotated images are interpolated); the plain model's do not, for any θ.
    let dev = Device::Cpu;
    let n = 32;
    // Seeded (candle's `Tensor::rand` is not), so that the curve is the same every run.
    let images: Vec<f32> = {
        use rand::Rng as _;
        let mut rng = common::rng(7);
        (0..n * 784).map(|_| rng.random::<f32>()).collect()
    };
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let split = liederiv::data::Split::digits("test", images, &labels, 28, 28);
    let degrees: Vec<f64> = (0..24).map(|k| 15.0 * k as f64).collect();
    let curve = |c: &Config, vm: &VarMap| {
        let model = build_with(c, vm, DType::F32, &dev).unwrap();
        liederiv::train::evaluate::angle_curve(model.as_ref(), c, &split, 0, &degrees, &dev).unwrap()
    };
    let vm = VarMap::new();
    let avg = curve(&cfg(&["model.average_rotations=4"]), &vm);
    let plain = curve(&cfg(&[]), &vm);
    // A C4 G-CNN is invariant by construction (group convolutions, pooled over the group).
    let gcnn = cfg(&[
        "model.kind=\"gcnn\"",
        "model.gcnn.widths=[4, 4]",
        "model.gcnn.group_order=4",
        "model.gcnn.kernel_size=5",
    ]);
    let g = curve(&gcnn, &VarMap::new());
    for (name, c) in [("C4-averaged ViT", &avg), ("C4 G-CNN", &g)] {
        assert_eq!(c.iter().map(|p| p.degrees).collect::<Vec<_>>(), degrees);
        let mut worst = 0.0f64;
        for (k, p) in c.iter().enumerate() {
            let base = &c[k % 6];
            assert_eq!(base.degrees, p.degrees % 90.0);
            assert_eq!(p.error, base.error, "{name}: {}° vs {}°", p.degrees, base.degrees);
            let d = (p.true_prob - base.true_prob).abs();
            worst = worst.max(d);
            assert!(
                d < 1e-6,
                "{name}: {}°: {} vs {}° {}",
                p.degrees,
                p.true_prob,
                base.degrees,
                base.true_prob
            );
        }
        // Not flat: 45° is another input than 0° (a random-init G-CNN's p(true) moves little:
        // 5.6e-5 on these images, still 50× the periodicity tolerance above).
        let off = (c[3].true_prob - c[0].true_prob).abs();
        assert!(off > 1e-5, "{name}: p(true) at 45° equals 0°'s ({off:e})");
        eprintln!(
            "{name}: max |p(θ) − p(θ mod 90°)| = {worst:.1e} over {} angles; |p(45°) − p(0°)| = {off:.1e}",
            degrees.len()
        );
    }
    // The control, for every θ of the first quadrant: the plain model's curve moves by 90°.
    for r in 0..6 {
        let spread = plain
            .iter()
            .skip(r)
            .step_by(6)
            .map(|p| (p.true_prob - plain[r].true_prob).abs())
            .fold(0.0, f64::max);
        assert!(
            spread > 1e-4,
            "the plain model's curve repeats at {}° + k·90° too ({spread:e})",
            plain[r].degrees
        );
    }
}
