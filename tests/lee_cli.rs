//! `liederiv lee` from the command line (issue 35): `--output features | tokens` (and probs,
//! logits) in the table's JSON, `--metrics group` and its JSON, the refusal of `--layerwise` with
//! tokens. The model is the timm-written ViT of tests/fixtures/timm_vit_avg (its features and
//! tokens and their LEE are checked against timm in tests/library_oracles.rs), loaded as the CLI
//! loads it, on seeded digits. Oracles: the library's `lee_split` on the same images normalised
//! here; the ViT's C4 output error recomputed here with index-permutation rotations; a C4
//! G-CNN's zero error at every step (it is equivariant by construction).

mod common;
use candle_core::{DType, Device, Tensor};
use liederiv::lie::{lee_split, LeeOutput, LeeSpec, Statistic};
use liederiv::transforms::{Stencil, Transform};
use liederiv::Config;
use std::path::Path;

/// The ViT of tests/fixtures/timm_vit_avg (timm's weights, mean pooling).
fn vit_sets() -> Vec<String> {
    let file = common::fixture("timm_vit_avg/model.safetensors");
    vec![
        "model.vit.patch_size=7".into(),
        "model.vit.dim=32".into(),
        "model.vit.depth=2".into(),
        "model.vit.heads=2".into(),
        "model.vit.pool=\"mean\"".into(),
        "init.weights=\"file\"".into(),
        format!("init.file={:?}", file.display().to_string()),
        "init.format=\"timm\"".into(),
    ]
}

const N_TEST: usize = 16;

/// Seeded digits in `dir` and the model's overrides.
fn setup(dir: &Path, model: &[String]) -> Vec<String> {
    let mut sets = common::mnist_root(dir, 40, N_TEST);
    sets.extend(model.iter().cloned());
    sets
}

/// `liederiv lee ARGS --json FILE`: the document.
fn lee_json(dir: &Path, sets: &[String], args: &[&str]) -> serde_json::Value {
    let path = dir.join("lee.json");
    let _ = std::fs::remove_file(&path);
    let mut all = vec!["lee"];
    all.extend_from_slice(args);
    let p = path.display().to_string();
    all.extend_from_slice(&["--json", &p]);
    let (ok, _, err) = common::liederiv(&all, sets);
    assert!(ok, "lee {args:?}: {err}");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The test split as the model sees it, (pixels − mean) / std, and its labels.
fn test_split(cfg: &Config) -> (Tensor, Tensor) {
    let s = liederiv::data::load_split(cfg, "test").unwrap();
    let liederiv::data::Images::Grey { pixels, h, w } = &s.images else {
        panic!("a digit split")
    };
    let x = Tensor::from_slice(pixels, (s.len(), 1, *h, *w), &Device::Cpu)
        .unwrap()
        .broadcast_sub(&Tensor::new(cfg.data.mean.get(0) as f32, &Device::Cpu).unwrap())
        .unwrap()
        .broadcast_div(&Tensor::new(cfg.data.std.get(0) as f32, &Device::Cpu).unwrap())
        .unwrap();
    let y = Tensor::from_vec(s.labels.clone(), s.len(), &Device::Cpu).unwrap();
    (x, y)
}

fn config(sets: &[String]) -> Config {
    Config::resolve_str("", "<test>", sets).unwrap()
}

#[test]
fn lee_outputs_from_the_cli_are_the_library_s() {
    let dir = tempfile::tempdir().unwrap();
    let sets = setup(dir.path(), &vit_sets());
    let cfg = config(&sets);
    let (x, y) = test_split(&cfg);
    assert_eq!(x.dim(0).unwrap(), N_TEST);
    let (_vm, model) = liederiv::models::build_model(&cfg, &Device::Cpu).unwrap();
    let mut rotate_means = Vec::new();
    for (name, output) in [
        ("probs", LeeOutput::Probs),
        ("logits", LeeOutput::Logits),
        ("features", LeeOutput::Features),
        ("tokens", LeeOutput::Tokens),
    ] {
        let doc = lee_json(
            dir.path(),
            &sets,
            &[
                "--splits",
                "test",
                "--transforms",
                "rotate,translate_x",
                "--output",
                name,
            ],
        );
        assert_eq!(doc["output"], name);
        assert_eq!(
            (doc["stencil"].as_str(), doc["statistic"].as_str()),
            (Some("central"), Some("sq"))
        );
        let split = &doc["splits"]["test"];
        assert_eq!(split["n"], N_TEST);

        let spec = LeeSpec {
            transforms: vec![Transform::Rotate, Transform::TranslateX],
            stencil: Stencil::Central,
            statistic: Statistic::Sq,
            output,
            batch_size: cfg.lee.batch_size,
        };
        let summary = lee_split(model.as_ref(), &x, Some(&y), &spec).unwrap();
        assert_eq!(split["accuracy"].as_f64(), summary.accuracy);
        let entries = summary.entries();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let want_names: &[&str] = if output.is_representation() {
            &["rotate", "translate_x", "rotate_scaled", "translate_x_scaled"]
        } else {
            &["rotate", "translate_x"]
        };
        assert_eq!(names, want_names, "{name}");
        let lee = split["lee"].as_object().unwrap();
        assert_eq!(lee.len(), entries.len(), "{name}: {lee:?}");
        for e in &entries {
            let (m, s) = (
                lee[&e.name]["mean"].as_f64().unwrap(),
                lee[&e.name]["stderr"].as_f64().unwrap(),
            );
            let rel = (m - e.mean).abs() / e.mean;
            eprintln!("{name} {}: CLI {m:e}, lee_split {:e} (rel {rel:.1e})", e.name, e.mean);
            assert!(
                e.mean > 0.0 && rel < 1e-5,
                "{name} {}: CLI {m:e} vs {:e}",
                e.name,
                e.mean
            );
            assert!(
                (s - e.stderr).abs() <= 1e-5 * e.stderr,
                "{name} {}: stderr {s:e} vs {:e}",
                e.name,
                e.stderr
            );
        }
        rotate_means.push(lee["rotate"]["mean"].as_f64().unwrap());
    }
    // Four different quantities, not one measured four times.
    for i in 0..4 {
        for j in 0..i {
            assert!(
                (rotate_means[i] - rotate_means[j]).abs() > 1e-3 * rotate_means[i],
                "{rotate_means:?}"
            );
        }
    }
}

#[test]
fn layerwise_refuses_tokens_and_decomposes_features() {
    let dir = tempfile::tempdir().unwrap();
    let sets = setup(dir.path(), &vit_sets());
    let json = dir.path().join("refused.json");
    let j = json.display().to_string();
    let args = [
        "lee",
        "--splits",
        "test",
        "--transforms",
        "rotate",
        "--layerwise",
        "--json",
        &j,
    ];
    let mut tokens = args.to_vec();
    tokens.extend_from_slice(&["--output", "tokens"]);
    let (ok, stdout, err) = common::liederiv(&tokens, &sets);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("--layerwise") && err.contains("tokens") && err.contains("features"),
        "{err}"
    );
    assert!(
        !json.exists() && !stdout.contains("wrote"),
        "a refused run wrote {stdout}"
    );
    // The same command measuring the features decomposes them, and its parts sum to the whole.
    let doc = lee_json(
        dir.path(),
        &sets,
        &[
            "--splits",
            "test",
            "--transforms",
            "rotate",
            "--layerwise",
            "--output",
            "features",
        ],
    );
    assert_eq!(doc["layerwise_split"], "test");
    let rot = &doc["layerwise"]["rotate"];
    let sum_err = rot["sum_rel_error"].as_f64().unwrap();
    assert!(sum_err < 1e-4, "sum rel error {sum_err:e}");
    let (e2e, lee) = (
        rot["end_to_end"].as_f64().unwrap(),
        doc["splits"]["test"]["lee"]["rotate"]["mean"].as_f64().unwrap(),
    );
    assert!(
        (e2e - lee).abs() < 1e-5 * lee,
        "end to end {e2e:e} vs the feature LEE {lee:e}"
    );
    let steps: Vec<&str> = rot["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps.last(), Some(&"fc_norm"), "the features end at fc_norm: {steps:?}");
    assert!(!steps.contains(&"head"), "{steps:?}");
}

/// rot90 (+90°, the rotation of `transforms`: x'(u) = x(A·u)) of `(B, C, H, W)` by index
/// permutation: x'[i][j] = x[H−1−j][i].
fn rot90(x: &Tensor) -> Tensor {
    x.flip(&[2]).unwrap().transpose(2, 3).unwrap().contiguous().unwrap()
}

/// Per image ‖a − b‖ / ‖b‖, averaged.
fn mean_rel(a: &Tensor, b: &Tensor) -> f64 {
    let num = (a - b).unwrap().sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    let den = b.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    (num / den)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn metrics_group_in_the_json() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--splits", "test", "--transforms", "rotate", "--metrics", "group"];

    // The ViT: C4 at the output only, the errors those of exact rotations.
    let sets = setup(dir.path(), &vit_sets());
    let doc = lee_json(dir.path(), &sets, &args);
    let g = &doc["splits"]["test"]["group"];
    assert_eq!(g["order"], 4);
    assert_eq!(g["angles_deg"], serde_json::json!([90.0, 180.0, 270.0]));
    let layers = g["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["step"], "output");
    let cfg = config(&sets);
    let (x, _) = test_split(&cfg);
    let (_vm, model) = liederiv::models::build_model(&cfg, &Device::Cpu).unwrap();
    let base = model.forward(&x).unwrap();
    let errors = layers[0]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3);
    let mut r = x.clone();
    for (k, e) in errors.iter().enumerate() {
        r = rot90(&r);
        let want = mean_rel(&model.forward(&r).unwrap(), &base);
        let got = e["mean"].as_f64().unwrap();
        eprintln!("ViT at {}°: CLI {got:e}, recomputed {want:e}", 90 * (k + 1));
        assert!(
            want > 1e-3 && (got - want).abs() < 1e-4 * want,
            "{}°: {got:e} vs {want:e}",
            90 * (k + 1)
        );
    }
    assert!(doc["splits"]["test"]["lee"]["rotate"]["mean"].as_f64().unwrap() > 0.0);

    // A C4 G-CNN: every step, every angle, float rounding only.
    let gcnn: Vec<String> = [
        "model.kind=\"gcnn\"",
        "model.gcnn.widths=[4, 4]",
        "model.gcnn.group_order=4",
        "model.gcnn.kernel_size=5",
        "name=\"gcnn\"",
    ]
    .map(String::from)
    .to_vec();
    let mut sets = common::mnist_root(dir.path(), 40, N_TEST);
    sets.extend(gcnn);
    let doc = lee_json(dir.path(), &sets, &args);
    let g = &doc["splits"]["test"]["group"];
    assert_eq!(g["order"], 4);
    let layers = g["layers"].as_array().unwrap();
    let steps: Vec<&str> = layers.iter().map(|l| l["step"].as_str().unwrap()).collect();
    assert_eq!(steps.first(), Some(&"block0.conv"));
    assert_eq!(steps.last(), Some(&"head"));
    assert!(steps.contains(&"group_pool"), "{steps:?}");
    for l in layers {
        let errors = l["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 3);
        for (a, e) in [90, 180, 270].iter().zip(errors) {
            let m = e["mean"].as_f64().unwrap();
            assert!(
                m < 1e-5 && e["stderr"].as_f64().is_some(),
                "{} at {a}°: {m:e}",
                l["step"]
            );
        }
    }

    // An unknown metric names the known ones.
    let (ok, _, err) = common::liederiv(&["lee", "--splits", "test", "--metrics", "lee,grup"], &sets);
    assert!(!ok && err.contains("grup") && err.contains("group"), "{err}");
}
