//! `liederiv export` (`models::export`): a model exported in timm's or transformers' layout and
//! read back by our own loader for that layout gives the same logits, bit for bit (the loader is
//! tested against timm and transformers fixtures in tests/weights.rs; the exported files were
//! also loaded by timm 1.0.31 and transformers 5.25.0 themselves, scripts/fixtures/check_export.py,
//! result in scripts/fixtures/check_export.out). Models without an outside layout are refused.

mod common;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use liederiv::config::{Config, InitConfig, InitWeights, WeightFormat};
use liederiv::models::export::{export_tensors, hf_config, timm_to_hf};
use liederiv::models::weights::{hf_to_timm, load_pretrained, WeightsError};
use liederiv::models::{build_with, frozen};
use std::collections::HashMap;

fn tiny(extra: &[&str]) -> Config {
    let mut all = vec!["seed=5"];
    all.extend_from_slice(extra);
    common::tiny_vit_config(32, &all)
}

fn images() -> Tensor {
    Tensor::randn(0f32, 1.0, (6, 1, 28, 28), &Device::Cpu).unwrap()
}

/// Export `cfg`'s seeded model in `format`, load it back as `init.weights = "file"` in that
/// format into a fresh model, and return both models' logits on `x`.
fn round_trip(cfg: &Config, format: WeightFormat, x: &Tensor) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let original = build_with(cfg, &vm, DType::F32, &dev).unwrap();
    let tensors = export_tensors(cfg, &vm, format).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    if format == WeightFormat::Hf {
        std::fs::write(dir.path().join("config.json"), hf_config(cfg).to_string()).unwrap();
    }
    let init = InitConfig {
        weights: InitWeights::File,
        file: file.display().to_string(),
        format,
        ..InitConfig::default()
    };
    let (m, d) = (&cfg.model, &cfg.data);
    let pre = load_pretrained(&init, &m.vit, d.image_size, d.channels, m.num_classes).unwrap();
    let back = VarMap::new();
    pre.insert_into(&back, &dev).unwrap();
    // A different seed: anything the file did not provide would come out different.
    let mut other = cfg.clone();
    other.seed += 1;
    build_with(&other, &back, DType::F32, &dev).unwrap();
    let a = original.forward(x).unwrap();
    let b = frozen(&other, &back, &dev).unwrap().forward(x).unwrap();
    (a, b)
}

fn assert_identical(a: &Tensor, b: &Tensor, what: &str) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
        assert_eq!(u.to_bits(), v.to_bits(), "{what}: logit {i}: {u} vs {v}");
    }
}

#[test]
fn exports_load_back_to_the_same_logits() {
    let x = images();
    for (pool, pos, formats) in [
        ("cls", "learned", vec![WeightFormat::Timm, WeightFormat::Hf]),
        ("cls", "sincos", vec![WeightFormat::Timm, WeightFormat::Hf]),
        ("mean", "learned", vec![WeightFormat::Timm]),
    ] {
        let cfg = tiny(&[
            &format!("model.vit.pool={pool:?}"),
            &format!("model.vit.pos_embed={pos:?}"),
        ]);
        for format in formats {
            let (a, b) = round_trip(&cfg, format, &x);
            assert_identical(&a, &b, &format!("{pool} / {pos} / {format}"));
        }
    }
}

#[test]
fn hf_names_are_the_inverse_of_the_loader_map() {
    let cfg = tiny(&["model.vit.pool=\"cls\""]);
    let vm = VarMap::new();
    build_with(&cfg, &vm, DType::F32, &Device::Cpu).unwrap();
    let ours = export_tensors(&cfg, &vm, WeightFormat::Timm).unwrap();
    let hf = timm_to_hf(ours.clone()).unwrap();
    assert!(hf.contains_key("vit.encoder.layer.1.attention.attention.value.weight"));
    assert!(hf.contains_key("classifier.bias") && hf.contains_key("vit.layernorm.weight"));
    let back: HashMap<String, Tensor> = hf_to_timm(hf).unwrap().tensors;
    let mut a: Vec<&String> = ours.keys().collect();
    let mut b: Vec<&String> = back.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (k, t) in &ours {
        assert_identical(t, &back[k], k);
    }
    let c = hf_config(&cfg);
    assert_eq!(
        (
            c["hidden_size"].as_u64(),
            c["intermediate_size"].as_u64(),
            c["num_channels"].as_u64()
        ),
        (Some(32), Some(128), Some(1))
    );
    assert_eq!(c["layer_norm_eps"].as_f64(), Some(1e-6));
}

#[test]
fn models_without_an_outside_layout_are_refused() {
    let refused = |cfg: &Config, format| {
        let vm = VarMap::new();
        build_with(cfg, &vm, DType::F32, &Device::Cpu).unwrap();
        match export_tensors(cfg, &vm, format) {
            Err(e @ WeightsError::Export { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {:?}", other.map(|t| t.len())),
        }
    };
    let cnn = refused(&tiny(&["model.kind=\"cnn\""]), WeightFormat::Timm);
    assert!(
        cnn.contains("model.kind = \"cnn\"") && cnn.contains("checkpoint.safetensors"),
        "{cnn}"
    );
    let mean = refused(&tiny(&["model.vit.pool=\"mean\""]), WeightFormat::Hf);
    assert!(mean.contains("cls token") && mean.contains("--format timm"), "{mean}");
    let eps = refused(&tiny(&["model.vit.ln_eps=1e-5"]), WeightFormat::Timm);
    assert!(eps.contains("ln_eps") && eps.contains("--format hf"), "{eps}");

    // From the command line: a clear error, a non-zero exit, nothing written.
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("gcnn");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_liederiv"))
        .args(["export", "--set", "model.kind=\"gcnn\"", "--format", "hf", "--out"])
        .arg(&dest)
        .args(["--set", &format!("output.dir={:?}", out.path().display().to_string())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("gcnn") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!dest.join("model.safetensors").exists());
}
