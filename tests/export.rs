//! `liederiv export` (`models::export`): a model exported in timm's or transformers' layout and
//! read back by our own loader for that layout gives the same logits, bit for bit (the loader is
//! tested against timm and transformers fixtures in tests/weights.rs; the exported files were
//! also loaded by timm 1.0.31 and transformers 5.25.0 themselves, scripts/fixtures/check_export.py,
//! result in scripts/fixtures/check_export.out). Models without an outside layout are refused.
//!
//! Against the libraries themselves (tests/fixtures/export, scripts/fixtures/make_export_fixture.py):
//! our export's JSON files hold, key by key, what transformers' `save_pretrained` and timm's
//! built model have for the same architecture; timm and transformers, loading the very files our
//! `export` writes today (same tensors, by SHA-256), compute our logits. An `--out` folder that
//! holds files is refused and left as it is.

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

// ---------------------------------------------------------------------------------------------
// Against timm and transformers (tests/fixtures/export).

fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// JSON equality with numbers compared as f64 (`1e-06` == `1e-6`, `4` == `4.0`).
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => x.as_f64() == y.as_f64(),
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(u, v)| same_json(u, v)),
        (Object(x), Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, u)| y.get(k).is_some_and(|v| same_json(u, v)))
        }
        _ => a == b,
    }
}

/// Every key of `ours` is in `theirs` with the same value; returns theirs' other keys.
fn assert_keys_equal(ours: &serde_json::Value, theirs: &serde_json::Value, what: &str) -> Vec<String> {
    let (o, t) = (ours.as_object().unwrap(), theirs.as_object().unwrap());
    for (k, v) in o {
        let w = t
            .get(k)
            .unwrap_or_else(|| panic!("{what}: ours has {k:?}, the library's has no such key"));
        assert!(same_json(v, w), "{what}: {k:?} is {v} in ours, {w} in the library's");
    }
    t.keys().filter(|k| !o.contains_key(*k)).cloned().collect()
}

/// SHA-256 of a tensor's float32 little-endian bytes (as the script hashes them).
fn digest(t: &Tensor) -> String {
    use sha2::Digest;
    let v: Vec<f32> = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// `liederiv export` run from the repository root (the fixture's paths are relative to it).
fn export_cli(format: &str, out: &std::path::Path, sets: &[String]) -> (bool, String) {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_liederiv"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["export", "--format", format, "--out"])
        .arg(out)
        .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
        .output()
        .unwrap();
    (run.status.success(), String::from_utf8_lossy(&run.stderr).into_owned())
}

fn fixture_sets(export: &serde_json::Value) -> Vec<String> {
    export["set"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn exports_hold_what_timm_and_transformers_write_and_load_to_our_logits() {
    let fx = common::fixture("export");
    let record = read_json(&fx.join("exports.json"));
    let io = candle_core::safetensors::load(fx.join("io.safetensors"), &Device::Cpu).unwrap();
    let work = tempfile::tempdir().unwrap();
    let runs = format!("output.dir={:?}", work.path().join("runs").display().to_string());
    let exports = record.as_object().unwrap();
    assert_eq!(exports.len(), 3);
    for (name, e) in exports {
        let format = e["format"].as_str().unwrap();
        let sets = fixture_sets(e);
        let out = work.path().join(name);
        // An existing empty folder is as good as a new one.
        if name == "timm_cls" {
            std::fs::create_dir(&out).unwrap();
        }
        let mut all = sets.clone();
        all.push(runs.clone());
        let (ok, err) = export_cli(format, &out, &all);
        assert!(ok, "{name}: {err}");

        // The tensors are the ones the libraries loaded.
        let tensors = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        let want = e["tensors"].as_object().unwrap();
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        assert_eq!(keys, want.keys().collect::<Vec<_>>(), "{name}: tensor names");
        for (k, t) in &tensors {
            assert_eq!(
                digest(t),
                want[k].as_str().unwrap(),
                "{name}: {k} differs from the file timm / transformers loaded \
                 (regenerate with scripts/fixtures/make_export_fixture.py if the change is meant)"
            );
        }

        // The JSON files, key by key.
        let cfg = Config::resolve_str("", "<test>", &sets).unwrap();
        match format {
            "hf" => {
                for (file, lib) in [
                    ("config.json", "transformers/config.json"),
                    ("preprocessor_config.json", "transformers/preprocessor_config.json"),
                ] {
                    let rest = assert_keys_equal(&read_json(&out.join(file)), &read_json(&fx.join(lib)), file);
                    eprintln!("{name}/{file}: every key as transformers writes it; only theirs: {rest:?}");
                }
            }
            _ => {
                let pool = name.strip_prefix("timm_").unwrap();
                let theirs = read_json(&fx.join(format!("timm/timm_{pool}.json")));
                let rest = assert_keys_equal(&read_json(&out.join("timm_args.json")), &theirs, "timm_args.json");
                assert_eq!(rest, ["fc_norm", "final_norm", "norm_eps", "pos_embed_shape"]);
                // What timm builds beyond the arguments is what our model is.
                let v = &cfg.model.vit;
                assert_eq!(theirs["norm_eps"].as_f64(), Some(v.ln_eps));
                let mean = v.pool == liederiv::config::Pool::Mean;
                assert_eq!(
                    (theirs["fc_norm"].as_bool(), theirs["final_norm"].as_bool()),
                    (Some(mean), Some(!mean))
                );
                let tokens = 1 + (cfg.data.image_size / v.patch_size).pow(2);
                assert_eq!(theirs["pos_embed_shape"], serde_json::json!([1, tokens, v.dim]));
            }
        }

        // Our model, loaded as the export loaded it, against the libraries on our files.
        let (_vm, model) = liederiv::models::build_model(&cfg, &Device::Cpu).unwrap();
        let ours = model.forward(&io["x"]).unwrap();
        let theirs = &io[&format!("logits_{name}")];
        let err = common::max_abs_diff(&ours, theirs);
        eprintln!(
            "{name}: max |ours - {}| = {err:.2e} (largest |logit| {:.2})",
            if format == "hf" { "transformers" } else { "timm" },
            common::max_abs(theirs)
        );
        assert!(err < 1e-5 * common::max_abs(theirs).max(1.0), "{name}: {err:e}");
        if format == "hf" {
            // The processor of our preprocessor_config.json normalises as our data pipeline does.
            let px = (&io["pixels"] / 255.0).unwrap().unsqueeze(1).unwrap();
            let ours_px = ((px - cfg.data.mean.get(0)).unwrap() / cfg.data.std.get(0)).unwrap();
            let d = common::max_abs_diff(&ours_px, &io["pixel_values_hf"]);
            eprintln!("{name}: pixel values vs ViTImageProcessor: max |diff| {d:.2e}");
            assert!(d < 1e-5, "{name}: pixel values differ by {d:e}");
            let l = common::max_abs_diff(&model.forward(&ours_px).unwrap(), &io["logits_hf_pixels"]);
            eprintln!("{name}: logits on those pixels: max |ours - transformers| = {l:.2e}");
            assert!(
                l < 1e-5 * common::max_abs(&io["logits_hf_pixels"]).max(1.0),
                "{name}: {l:e}"
            );
        }
    }
}

#[test]
fn export_into_a_folder_that_holds_files_is_refused() {
    let record = read_json(&common::fixture("export/exports.json"));
    let sets = fixture_sets(&record["timm_cls"]);
    let work = tempfile::tempdir().unwrap();
    let mut all = sets.clone();
    all.push(format!(
        "output.dir={:?}",
        work.path().join("runs").display().to_string()
    ));
    let listing = |dir: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };

    // A folder of the user's.
    let mine = work.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    let (ok, err) = export_cli("timm", &mine, &all);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("already holds files") && err.contains("notes.txt"),
        "{err}"
    );
    assert_eq!(listing(&mine), [("notes.txt".to_string(), b"keep me".to_vec())]);

    // An earlier export (refused in the other format too: its files would mix).
    let first = work.path().join("first");
    assert!(export_cli("timm", &first, &all).0);
    let before = listing(&first);
    assert_eq!(
        before.iter().map(|f| f.0.as_str()).collect::<Vec<_>>(),
        ["config.json", "model.safetensors", "timm_args.json"]
    );
    for format in ["timm", "hf"] {
        let (ok, err) = export_cli(format, &first, &all);
        assert!(
            !ok && err.contains("model.safetensors") && err.contains("timm_args.json"),
            "{err}"
        );
        assert_eq!(listing(&first), before, "a refused {format} export changed the folder");
    }

    // A file where the folder should be.
    let file = work.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let (ok, err) = export_cli("timm", &file, &all);
    assert!(!ok && err.contains("is a file"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}
