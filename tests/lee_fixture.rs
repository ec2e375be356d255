//! Our LEE on the ViT against PyTorch (issue 3): `scripts/fixtures/make_lee_fixture.py` builds a
//! tiny ViT with timm's names (checked against timm's VisionTransformer), random weights saved to
//! `tests/fixtures/lee_tiny_vit.safetensors`, and computes per-image LEE with torch.func.jvp in
//! float64 on our central stencil; these tests load the same weights into our `Vit` and match.
//! Also: the layerwise sum check on the ViT, and (ignored) the JVP-vs-forward timing.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use liederiv::config::VitConfig;
use liederiv::lie::{decompose, lee_per_image, LeeOutput, Statistic};
use liederiv::models::vit::Vit;
use liederiv::models::Model;
use liederiv::transforms::{Stencil, Transform};
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture() -> Value {
    let text = std::fs::read_to_string(format!("{DIR}/lee_tiny_vit.json")).expect("fixture json");
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn tiny_cfg(fx: &Value) -> VitConfig {
    let c = &fx["config"];
    let get = |k: &str| c[k].as_u64().unwrap() as usize;
    VitConfig {
        patch_size: get("patch"),
        dim: get("dim"),
        depth: get("depth"),
        heads: get("heads"),
        mlp_ratio: c["mlp_ratio"].as_f64().unwrap(),
        pool: serde_json::from_value(c["pool"].clone()).unwrap(),
        ..VitConfig::default()
    }
}

fn load(dtype: DType) -> (Vit, Tensor, Value) {
    let fx = fixture();
    let weights = candle_core::safetensors::load(format!("{DIR}/lee_tiny_vit.safetensors"), &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    let vit = Vit::new(&tiny_cfg(&fx), 28, 1, 10, vb).unwrap();
    let shape: Vec<usize> = fx["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let x = Tensor::from_vec(floats(&fx["images"]), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (vit, x, fx)
}

fn check(dtype: DType, tol: f64) {
    let (vit, x, fx) = load(dtype);
    let logits: Vec<f64> = vit
        .forward(&x)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in logits.iter().zip(floats(&fx["logits"])) {
        assert!((a - b).abs() < tol * 10.0 * b.abs().max(1.0), "logits {a} vs {b}");
    }
    let trs: Vec<Transform> = serde_json::from_value(fx["transforms"].clone()).unwrap();
    let mut worst = 0.0f64;
    for (stat, key, output) in [
        (Statistic::Sq, "sq", LeeOutput::Probs),
        (Statistic::Abs, "abs", LeeOutput::Probs),
        (Statistic::Sq, "sq_logits", LeeOutput::Logits),
    ] {
        let ours = lee_per_image(&vit, &x, &trs, Stencil::Central, stat, output).unwrap();
        for (t, tr) in trs.iter().enumerate() {
            let name = tr.name();
            let want = floats(&fx["lee"][name][key]);
            for (a, b) in ours[t].iter().zip(&want) {
                let rel = (a - b).abs() / b.abs();
                worst = worst.max(rel);
                assert!(
                    rel < tol,
                    "{dtype:?} {name} {key}: ours {a:e} torch {b:e} (rel {rel:e})"
                );
            }
        }
    }
    println!("{dtype:?}: worst relative error vs torch.func.jvp {worst:e}");
}

#[test]
fn vit_lee_matches_pytorch_fixture_f64() {
    check(DType::F64, 1e-9);
}

#[test]
fn vit_lee_matches_pytorch_fixture_f32() {
    check(DType::F32, 1e-5);
}

#[test]
fn vit_layerwise_contributions_sum_to_end_to_end_f32() {
    let (vit, x, _) = load(DType::F32);
    for tr in [
        Transform::Rotate,
        Transform::TranslateX,
        Transform::Scale,
        Transform::Hyperbolic,
    ] {
        let d = decompose(&vit, &x, tr, Stencil::Central, LeeOutput::Probs).unwrap();
        let f64t = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let e2e = f64t(&d.end_to_end);
        let sum = f64t(&d.contributions).sum(0).unwrap();
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap().sqrt();
        let rel = norm(&(&sum - &e2e).unwrap()) / norm(&e2e);
        println!("{tr}: {} steps, sum rel error {rel:e}", d.steps.len());
        assert!(rel < 1e-4, "{tr}: {rel:e}");
        assert_eq!(d.steps[0].name, "patch_embed");
    }
}

/// JVP cost relative to a forward: `cargo test --release --test lee_fixture -- --ignored --nocapture`.
#[test]
#[ignore]
fn jvp_cost_relative_to_forward() {
    use candle_nn::VarMap;
    let time = |f: &dyn Fn(), reps: usize| {
        f();
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        t0.elapsed().as_secs_f64() / reps as f64
    };
    let cases = [
        (
            "tiny ViT (p7, d64, depth 4), batch 128, 28 px",
            VitConfig::tiny_mnist(),
            28,
            1,
            128,
            3,
        ),
        (
            "ViT-B/16-shaped (p16, d768, depth 12, heads 12), batch 8, 224 px",
            VitConfig {
                patch_size: 16,
                dim: 768,
                depth: 12,
                heads: 12,
                ..VitConfig::default()
            },
            224,
            3,
            8,
            1,
        ),
    ];
    for (name, cfg, size, chans, b, reps) in cases {
        let vm = VarMap::new();
        let vit = Vit::new(
            &cfg,
            size,
            chans,
            10,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (b, chans, size, size), &Device::Cpu).unwrap();
        let fwd = time(
            &|| {
                vit.forward(&x).unwrap();
            },
            reps,
        );
        for trs in [
            vec![Transform::Rotate],
            vec![Transform::Rotate, Transform::TranslateX, Transform::TranslateY],
        ] {
            let jvp = time(
                &|| {
                    lee_per_image(&vit, &x, &trs, Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
                },
                reps,
            );
            println!(
                "{name}: forward {:.1} ms, LEE with {} transform(s) {:.1} ms = {:.2}x",
                fwd * 1e3,
                trs.len(),
                jvp * 1e3,
                jvp / fwd
            );
        }
    }
}
