//! The gradient of the LEE penalty (the LEE-regularised training row of Table 1) on the real
//! models, against f64 central differences: for every parameter tensor of a mean-pooled ViT, a
//! CNN with batch norm in eval mode (random running statistics), a C8 G-CNN, timm's ResNet (basic
//! and bottleneck blocks) and ConvNeXt, the directional
//! derivative along a random direction, ⟨∇P, v⟩ from backprop through the JVP against
//! (P(θ + εv) − P(θ − εv)) / 2ε. Also for the scale-free feature penalty (`features`), whose
//! denominator is differentiated too.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use common::{blob_images, randn, rng, tiny_vit_config};
use liederiv::lie::{lee_penalty, LeeOutput};
use liederiv::models::build_with;
use liederiv::transforms::{Stencil, Transform};
use liederiv::Config;

fn check(name: &str, cfg: &Config, output: LeeOutput) {
    check_with(name, cfg, output, false)
}

/// `random_biases`: draw every bias (N(0, 0.3²)) instead of timm's zeros. A zero-initialised
/// ConvNeXt stem maps a blank patch to equal channels, where its LayerNorm's variance is 0 and the
/// penalty's curvature ~1/ε; a zero bias after a zero-initialised last norm puts a ResNet's ReLU
/// exactly at its kink on blank pixels. Central differences need neither.
fn check_with(name: &str, cfg: &Config, output: LeeOutput, random_biases: bool) {
    let vm = VarMap::new();
    let model = build_with(cfg, &vm, DType::F64, &Device::Cpu).unwrap();
    let mut r = rng(21);
    let vars: Vec<(String, candle_core::Var)> = {
        let data = vm.data().lock().unwrap();
        let mut v: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    // Eval-mode batch norm with statistics that are not the identity map.
    for (n, v) in &vars {
        if random_biases && n.ends_with("bias") {
            v.set(&randn(v.dims(), 0.3, DType::F64, &mut r)).unwrap();
        }
        if n.ends_with("running_mean") {
            v.set(&randn(v.dims(), 0.3, DType::F64, &mut r)).unwrap();
        } else if n.ends_with("running_var") {
            v.set(&(randn(v.dims(), 0.3, DType::F64, &mut r).abs().unwrap() + 0.5).unwrap())
                .unwrap();
        }
    }
    let x = blob_images(2, 1, 28, 3, DType::F64, &mut r);
    let trs = [Transform::Rotate, Transform::TranslateX];
    let penalty = || {
        lee_penalty(model.as_ref(), &x, &trs, Stencil::Central, output)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let loss = lee_penalty(model.as_ref(), &x, &trs, Stencil::Central, output).unwrap();
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for (n, v) in &vars {
        if n.contains("running_") {
            continue; // buffers, not parameters: the penalty reads them but nothing trains them
        }
        if output == LeeOutput::Features && n.starts_with("head.") {
            // The features are what the head reads: the penalty on them never sees the head.
            assert!(
                grads.get(v.as_tensor()).is_none(),
                "{name}: the feature penalty reached {n}"
            );
            continue;
        }
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {n}"))
            .clone();
        let dir = randn(v.dims(), 1.0, DType::F64, &mut r);
        let analytic = (&g * &dir).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let w0 = v.as_tensor().copy().unwrap();
        // Small enough that no ReLU or max-pool kink is crossed along ±εv (at 1e-5 one was, in
        // the G-CNN: a jump of the tangent, not a derivative), large enough for f64 rounding.
        let eps = 1e-6;
        let at = |s: f64| {
            v.set(&(&w0 + (&dir * s).unwrap()).unwrap()).unwrap();
            penalty()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        v.set(&w0).unwrap();
        let scale = analytic
            .abs()
            .max(numeric.abs())
            .max(1e-9 * loss.to_scalar::<f64>().unwrap());
        let rel = (analytic - numeric).abs() / scale;
        assert!(
            rel < 1e-5,
            "{name} {output}: ∂P/∂{n} along v: backprop {analytic:e} vs central differences {numeric:e} (rel {rel:e})"
        );
        checked += 1;
    }
    assert!(checked >= 6, "{name}: only {checked} parameter tensors");
}

fn conv(kind: &str, extra: &[&str]) -> Config {
    let mut sets = vec![format!("model.kind=\"{kind}\"")];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::resolve_str("", "<test>", &sets).unwrap()
}

#[test]
fn vit_mean_pool_penalty_gradient_matches_central_differences() {
    let cfg = tiny_vit_config(16, &["model.vit.pool=\"mean\""]);
    check("vit_mean", &cfg, LeeOutput::Probs);
    check("vit_mean", &cfg, LeeOutput::Features);
}

#[test]
fn cnn_batch_norm_penalty_gradient_matches_central_differences() {
    let cfg = conv("cnn", &["model.cnn.widths=[4, 8]"]);
    check("cnn", &cfg, LeeOutput::Probs);
}

#[test]
fn resnet_penalty_gradient_matches_central_differences() {
    for block in ["basic", "bottleneck"] {
        let cfg = conv(
            "resnet",
            &[
                &format!("model.resnet.block=\"{block}\""),
                "model.resnet.layers=[1, 1]",
                "model.resnet.channels=[4, 4]",
            ],
        );
        check_with(&format!("resnet {block}"), &cfg, LeeOutput::Probs, true);
    }
}

#[test]
fn convnext_penalty_gradient_matches_central_differences() {
    let cfg = conv(
        "convnext",
        &[
            "model.convnext.depths=[1, 1]",
            "model.convnext.dims=[4, 8]",
            "model.convnext.patch_size=4",
            "model.convnext.ls_init_value=0.5",
        ],
    );
    check_with("convnext", &cfg, LeeOutput::Probs, true);
}

#[test]
fn c8_gcnn_penalty_gradient_matches_central_differences() {
    let cfg = conv(
        "gcnn",
        &[
            "model.gcnn.widths=[2, 2]",
            "model.gcnn.group_order=8",
            "model.gcnn.kernel_size=5",
        ],
    );
    check("gcnn_c8", &cfg, LeeOutput::Probs);
}
