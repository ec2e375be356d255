//! Pretrained-weight loading (`models::weights`) against fixtures made by committed scripts:
//! `scripts/fixtures/make_timm_fixture.py` (a tiny timm ViT, its inputs and logits) and
//! `scripts/fixtures/make_hf_fixture.py` (the same encoder in the Hugging Face ViTMAE / ViTModel
//! layouts, split q/k/v with torch.chunk). The oracle for the HF key map is therefore timm's own
//! state dict: every HF fixture must map back to exactly those tensors.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::max_abs_diff;
use common::{fixture, populated_cache, tiny_fixture_vit};
use liederiv::config::{InitConfig, InitWeights, Pool, PosEmbed, VitConfig, WeightFormat};
use liederiv::hub::HubError;
use liederiv::models::vit::Vit;
use liederiv::models::weights::{
    self, adapt, check, expected_shapes, hf_to_timm, load_pretrained, read_checkpoint, Layout, Pretrained, WeightsError,
};
use liederiv::models::Model;
use std::collections::HashMap;
use std::path::Path;

/// The fixtures' encoder with cls pooling.
fn tiny() -> VitConfig {
    tiny_fixture_vit(Pool::Cls, PosEmbed::Learned)
}

fn timm_tensors() -> HashMap<String, Tensor> {
    read_checkpoint(&fixture("timm_vit/model.safetensors")).unwrap()
}

/// `got` holds exactly the keys of `want` (minus `except`), with bit-identical values.
fn assert_same_tensors(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, except: &[&str]) {
    let mut g: Vec<&String> = got.keys().collect();
    let mut w: Vec<&String> = want.keys().filter(|k| !except.contains(&k.as_str())).collect();
    g.sort();
    w.sort();
    assert_eq!(g, w);
    for (k, t) in got {
        assert_eq!(max_abs_diff(t, &want[k]), 0.0, "{k}");
    }
}

/// Our ViT built on a VarMap pre-filled with the loaded tensors (insert, then build, so that
/// absent parameters get initialised).
fn build_vit(pre: &Pretrained, vit: &VitConfig, image_size: usize) -> Vit {
    let vm = VarMap::new();
    pre.insert_into(&vm, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = Vit::new(vit, image_size, 1, 10, vb).unwrap();
    assert_eq!(
        vm.all_vars().len(),
        pre.tensors.len(),
        "the model created parameters of its own"
    );
    model
}

fn file_init(path: &Path, format: &str) -> InitConfig {
    InitConfig {
        weights: InitWeights::File,
        file: path.display().to_string(),
        format: serde_json::from_value(serde_json::json!(format)).unwrap(),
        ..InitConfig::default()
    }
}

/// A Hub cache laid out as `huggingface-cli download --cache-dir` leaves it.
fn hub_init(repo: &str, cache: &Path) -> InitConfig {
    InitConfig {
        weights: InitWeights::Hub,
        hub_repo: repo.into(),
        hub_cache_dir: cache.display().to_string(),
        offline: true,
        format: WeightFormat::Hf,
        ..InitConfig::default()
    }
}

#[test]
fn timm_checkpoint_loads_unchanged() {
    let got = load_pretrained(
        &file_init(&fixture("timm_vit/model.safetensors"), "timm"),
        &tiny(),
        28,
        1,
        10,
    )
    .unwrap();
    assert!(got.notes.is_empty(), "{:?}", got.notes);
    assert_same_tensors(&got.tensors, &timm_tensors(), &[]);
}

#[test]
fn mae_style_wrapped_pth_is_unwrapped() {
    // torch.save({"model": state_dict, "epoch": 0}) as facebookresearch/mae saves checkpoints.
    let got = read_checkpoint(&fixture("timm_vit/mae_style.pth")).unwrap();
    assert_same_tensors(&got, &timm_tensors(), &[]);
}

#[test]
fn hf_mae_layout_maps_to_timm_and_decoder_names() {
    let hf = read_checkpoint(&fixture("hf_vit_mae/model.safetensors")).unwrap();
    let mapped = hf_to_timm(hf).unwrap();
    assert!(mapped.notes.is_empty(), "{:?}", mapped.notes);
    let mut want = timm_tensors();
    want.remove("head.weight");
    want.remove("head.bias");
    want.extend(read_checkpoint(&fixture("hf_vit_mae/decoder_ours.safetensors")).unwrap());
    assert_same_tensors(&mapped.tensors, &want, &[]);

    // Through the config path, the classifier drops the decoder (and says so) and keeps the
    // encoder bit-for-bit; the head is new.
    let init = file_init(&fixture("hf_vit_mae/model.safetensors"), "hf");
    let got = load_pretrained(&init, &tiny(), 28, 1, 10).unwrap();
    assert_same_tensors(&got.tensors, &timm_tensors(), &["head.weight", "head.bias"]);
    let dropped = got.notes.iter().filter(|n| n.contains("MAE decoder")).count();
    assert_eq!(dropped, 8 + 12, "{:?}", got.notes); // 8 top-level + 12 per decoder block
}

#[test]
fn hf_pytorch_bin_without_prefix_loads() {
    let init = file_init(&fixture("hf_vit_bin/pytorch_model.bin"), "hf");
    let got = load_pretrained(&init, &tiny(), 28, 1, 10).unwrap();
    assert_same_tensors(&got.tensors, &timm_tensors(), &["head.weight", "head.bias"]);
    let mut notes = got.notes.clone();
    notes.sort();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].starts_with("dropped pooler.dense.bias"), "{notes:?}");
}

#[test]
fn hub_cache_safetensors_first_then_bin_fallback() {
    let repo = "someone/tiny-vit-mae";
    let cache = populated_cache(
        repo,
        &[
            ("config.json", fixture("hf_vit_mae/config.json")),
            ("model.safetensors", fixture("hf_vit_mae/model.safetensors")),
            // A broken .bin proves the safetensors file is the one read.
            ("pytorch_model.bin", fixture("hf_vit_mae/config.json")),
        ],
    );
    let got = load_pretrained(&hub_init(repo, cache.path()), &tiny(), 28, 1, 10).unwrap();
    assert_same_tensors(&got.tensors, &timm_tensors(), &["head.weight", "head.bias"]);

    let repo = "someone/tiny-vit";
    let cache = populated_cache(
        repo,
        &[
            ("config.json", fixture("hf_vit_bin/config.json")),
            ("pytorch_model.bin", fixture("hf_vit_bin/pytorch_model.bin")),
        ],
    );
    let got = load_pretrained(&hub_init(repo, cache.path()), &tiny(), 28, 1, 10).unwrap();
    assert_same_tensors(&got.tensors, &timm_tensors(), &["head.weight", "head.bias"]);
}

#[test]
fn hub_timm_repo_and_hf_classifier_head() {
    // A timm-layout Hub repo (as timm/* repos are): model.safetensors only, no config.json needed.
    let repo = "someone/tiny-timm-vit";
    let cache = populated_cache(repo, &[("model.safetensors", fixture("timm_vit/model.safetensors"))]);
    let init = InitConfig {
        format: WeightFormat::Timm,
        ..hub_init(repo, cache.path())
    };
    let got = load_pretrained(&init, &tiny(), 28, 1, 10).unwrap();
    assert_same_tensors(&got.tensors, &timm_tensors(), &[]);

    // ViTForImageClassification's `classifier` becomes our head, kept when the classes agree.
    let timm = timm_tensors();
    let mut hf = read_checkpoint(&fixture("hf_vit_bin/pytorch_model.bin")).unwrap();
    hf.insert("classifier.weight".into(), timm["head.weight"].clone());
    hf.insert("classifier.bias".into(), timm["head.bias"].clone());
    let got = weights::convert(hf, Layout::Hf, &tiny(), 28, 1, 10).unwrap();
    assert_same_tensors(&got.tensors, &timm, &[]);
}

#[test]
fn hub_offline_without_cache_names_repo_and_remedy() {
    let cache = tempfile::tempdir().unwrap();
    let err = load_pretrained(&hub_init("facebook/vit-mae-base", cache.path()), &tiny(), 28, 1, 10).unwrap_err();
    match &err {
        WeightsError::HubWeights { safetensors, bin, .. } => {
            assert!(matches!(**safetensors, HubError::NotCached { .. }), "{safetensors:?}");
            assert!(matches!(**bin, HubError::NotCached { .. }), "{bin:?}");
        }
        other => panic!("expected HubWeights, got {other:?}"),
    }
    let msg = err.to_string();
    for needle in [
        "facebook/vit-mae-base",
        "model.safetensors",
        "pytorch_model.bin",
        "huggingface-cli download",
    ] {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }

    // Weights cached but config.json not: the config's own NotCached error.
    let repo = "someone/no-config";
    let cache = populated_cache(repo, &[("model.safetensors", fixture("hf_vit_mae/model.safetensors"))]);
    let err = load_pretrained(&hub_init(repo, cache.path()), &tiny(), 28, 1, 10).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Hub(HubError::NotCached { file, .. }) if file == "config.json"),
        "{err:?}"
    );
}

#[test]
fn config_json_must_match_model_config() {
    let init = file_init(&fixture("hf_vit_mae/model.safetensors"), "hf");
    let vit = VitConfig {
        heads: 4,
        mlp_ratio: 2.0,
        ln_eps: 1e-12,
        ..tiny()
    };
    let err = load_pretrained(&init, &vit, 28, 1, 10).unwrap_err();
    let WeightsError::ConfigMismatch { mismatches, .. } = &err else {
        panic!("expected ConfigMismatch, got {err:?}");
    };
    assert_eq!(
        mismatches,
        &vec![
            "model.vit.heads = 4, checkpoint has 2".to_string(),
            "model.vit.mlp_ratio = 2, checkpoint has 4 (intermediate_size 128 / hidden_size 32)".to_string(),
            "model.vit.ln_eps = 1e-12, checkpoint has 1e-6".to_string(),
        ]
    );
    // And the checkpoint's config, applied to ours, gives back the fixture's encoder.
    let hf = weights::HfVitConfig::read(&fixture("hf_vit_mae/config.json")).unwrap();
    assert_eq!(hf.vit_config(&vit), tiny());
}

#[test]
fn wrong_shapes_list_every_mismatch_and_missing_key() {
    // depth 3 and mlp_ratio 2: both fc layers of both blocks mismatch, block 2 is missing.
    let vit = VitConfig {
        depth: 3,
        mlp_ratio: 2.0,
        ..tiny()
    };
    let init = file_init(&fixture("timm_vit/model.safetensors"), "timm");
    let err = load_pretrained(&init, &vit, 28, 1, 10).unwrap_err();
    let WeightsError::Shapes {
        mismatches,
        missing,
        unexpected,
    } = &err
    else {
        panic!("expected Shapes, got {err:?}");
    };
    assert_eq!(mismatches.len(), 6, "{mismatches:?}");
    assert!(mismatches.contains(&"blocks.0.mlp.fc1.weight: checkpoint [128, 32] vs model [64, 32]".to_string()));
    assert!(mismatches.contains(&"blocks.1.mlp.fc2.weight: checkpoint [32, 128] vs model [32, 64]".to_string()));
    assert_eq!(missing.len(), 12, "{missing:?}");
    assert!(missing.iter().all(|k| k.starts_with("blocks.2.")), "{missing:?}");
    assert!(unexpected.is_empty());
    let msg = err.to_string();
    assert!(msg.contains("6 shape mismatches, 12 missing"), "{msg}");
    assert!(msg.contains("blocks.2.attn.qkv.weight"), "{msg}");

    // A key the model has no use for is unexpected, not silently dropped.
    let mut t = timm_tensors();
    t.insert(
        "blocks.0.ls1.gamma".into(),
        Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = check(&t, &expected_shapes(&tiny(), 28, 1, 10).unwrap()).unwrap_err();
    assert!(
        matches!(&err, WeightsError::Shapes { unexpected, .. } if unexpected == &vec!["blocks.0.ls1.gamma".to_string()]),
        "{err:?}"
    );
}

#[test]
fn new_head_and_mean_pooling_follow_mae_finetuning() {
    // 5 classes: the 10-class head is dropped (the model makes a fresh one).
    let init = file_init(&fixture("timm_vit/model.safetensors"), "timm");
    let got = load_pretrained(&init, &tiny(), 28, 1, 5).unwrap();
    assert_same_tensors(&got.tensors, &timm_tensors(), &["head.weight", "head.bias"]);
    assert_eq!(got.notes.len(), 2, "{:?}", got.notes);
    assert!(got.notes.iter().all(|n| n.contains("fresh head")));

    // Mean pooling: `norm` is dropped, `fc_norm` is new (MAE's global_pool fine-tuning).
    let vit = VitConfig {
        pool: Pool::Mean,
        ..tiny()
    };
    let got = load_pretrained(&init, &vit, 28, 1, 10).unwrap();
    assert_same_tensors(&got.tensors, &timm_tensors(), &["norm.weight", "norm.bias"]);
    assert!(!got.tensors.contains_key("fc_norm.weight"));
}

#[test]
fn rgb_patch_embedding_summed_for_grey_input() {
    // A 3-channel checkpoint: the fixture with an RGB patch embedding.
    let dev = Device::Cpu;
    let w3 = Tensor::randn(0f32, 0.1, (32, 3, 7, 7), &dev).unwrap();
    let mut tensors = timm_tensors();
    tensors.insert("patch_embed.proj.weight".into(), w3.clone());
    let pre = Pretrained {
        tensors,
        notes: Vec::new(),
    };
    let grey = expected_shapes(&tiny(), 28, 1, 10).unwrap();
    let got = adapt(pre, &grey).unwrap();
    check(&got.tensors, &grey).unwrap();
    let w1 = &got.tensors["patch_embed.proj.weight"];
    assert_eq!(got.notes.len(), 1, "{:?}", got.notes);

    // The property that justifies it: a grey image replicated to RGB through the RGB
    // weights gives the same patch embedding as the grey image through the summed weights.
    let x = Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &dev).unwrap();
    let rgb = x.repeat((1, 3, 1, 1)).unwrap();
    let a = rgb.conv2d(&w3, 0, 7, 1, 1).unwrap();
    let b = x.conv2d(w1, 0, 7, 1, 1).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-5);

    // 1 -> 3 (replicate / 3): a grey image replicated to RGB sees the grey weights.
    let pre = Pretrained {
        tensors: got.tensors,
        notes: Vec::new(),
    };
    let rgb_model = expected_shapes(&tiny(), 28, 3, 10).unwrap();
    let back = adapt(pre, &rgb_model).unwrap();
    check(&back.tensors, &rgb_model).unwrap();
    let c = rgb
        .conv2d(&back.tensors["patch_embed.proj.weight"], 0, 7, 1, 1)
        .unwrap();
    assert!(max_abs_diff(&b, &c) < 1e-5);
}

#[test]
fn broken_hf_checkpoints_are_named() {
    let mut hf = read_checkpoint(&fixture("hf_vit_mae/model.safetensors")).unwrap();
    hf.remove("vit.encoder.layer.1.attention.attention.key.bias");
    hf.insert(
        "vit.encoder.layer.0.crossattention.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = hf_to_timm(hf).unwrap_err();
    let WeightsError::HfKeys { problems } = &err else {
        panic!("expected HfKeys, got {err:?}");
    };
    assert_eq!(
        problems,
        &vec![
            "blocks.1: attention bias lacks key".to_string(),
            "unrecognised key vit.encoder.layer.0.crossattention.weight".to_string(),
        ]
    );
    // Unknown formats and non-pretrained sources are refused with the key to change.
    // (An unknown name such as "onnx" no longer reaches the loader: the config refuses it.)
    let onnx = liederiv::Config::resolve_str("", "t", &["init.format=\"onnx\"".to_string()]);
    assert!(onnx.is_err_and(|e| e.to_string().contains("init.format")));
    assert!(matches!(
        Layout::of(WeightFormat::Liederiv),
        Err(WeightsError::Format { .. })
    ));
    let random = InitConfig::default();
    assert!(matches!(
        load_pretrained(&random, &tiny(), 28, 1, 10),
        Err(WeightsError::NotPretrained { .. })
    ));
    // A missing file names the path.
    let err = read_checkpoint(Path::new("/nonexistent/model.safetensors")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.safetensors"), "{err}");
}

/// timm's logits (eval mode) for the fixture's weights and input, made by
/// scripts/fixtures/make_timm_fixture.py:
///   model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=32,
///       depth=2, num_heads=2, in_chans=1, num_classes=10, global_pool="token").eval()
///   logits = model(x)
#[test]
fn timm_checkpoint_gives_timms_logits() {
    let io = read_checkpoint(&fixture("timm_vit/io.safetensors")).unwrap();
    let init = file_init(&fixture("timm_vit/model.safetensors"), "timm");
    let got = load_pretrained(&init, &tiny(), 28, 1, 10).unwrap();
    let logits = build_vit(&got, &tiny(), 28).forward(&io["x"]).unwrap();
    let err = max_abs_diff(&logits, &io["logits"]);
    eprintln!("max |ours - timm| logits at 28 px: {err:.2e}");
    assert!(err < 1e-4, "max |ours - timm| = {err}");
}

/// The same weights at 35x35 input (4x4 -> 5x5 token grid): the position embedding is resampled
/// as MAE's interpolate_pos_embed does (torch.nn.functional.interpolate, bicubic,
/// align_corners=False), and the model gives timm's logits at that resolution:
///   pos35 = resample_abs_pos_embed(pos, new_size=(5, 5), num_prefix_tokens=1, antialias=False)
#[test]
fn pos_embed_interpolated_to_a_larger_grid() {
    let io = read_checkpoint(&fixture("timm_vit/io.safetensors")).unwrap();
    let init = file_init(&fixture("timm_vit/model.safetensors"), "timm");
    let got = load_pretrained(&init, &tiny(), 35, 1, 10).unwrap();
    assert_eq!(
        got.notes,
        vec!["pos_embed: interpolated from a 4x4 to a 5x5 token grid".to_string()]
    );
    let err = max_abs_diff(&got.tensors["pos_embed"], &io["pos_embed_35"]);
    eprintln!("max |ours - torch| interpolated pos_embed: {err:.2e}");
    assert!(err < 1e-5, "pos_embed max diff {err}");
    let logits = build_vit(&got, &tiny(), 35).forward(&io["x35"]).unwrap();
    let err = max_abs_diff(&logits, &io["logits35"]);
    eprintln!("max |ours - timm| logits at 35 px: {err:.2e}");
    assert!(err < 1e-4, "max |ours - timm| at 35 px = {err}");

    // A fixed sin-cos model has no pos_embed parameter: the checkpoint's is dropped.
    let sincos = VitConfig {
        pos_embed: PosEmbed::Sincos,
        ..tiny()
    };
    let got = load_pretrained(&init, &sincos, 28, 1, 10).unwrap();
    assert!(!got.tensors.contains_key("pos_embed"));
    assert!(got.notes[0].contains("sin-cos"), "{:?}", got.notes);
}
