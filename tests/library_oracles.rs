//! Our ViT, MAE and loader against the real libraries, not against our own conversions:
//! - `scripts/fixtures/make_transformers_fixture.py`: transformers builds ViTForImageClassification,
//!   ViTModel and ViTMAEForPreTraining from tiny configs and writes them with `save_pretrained`;
//!   the references are their own forward passes and ViTMAE's own loss;
//! - `scripts/fixtures/make_timm_avg_fixture.py`: timm's VisionTransformer with
//!   `global_pool="avg"` (fc_norm), its logits and its LEE (torch.func.jvp in float64);
//! - `scripts/fixtures/make_timm_outputs_fixture.py`: the same model's pooled features and patch
//!   tokens, and their LEE (`lee.output = "features" | "tokens"`), from timm's forward in float64.
//!
//! f32 tolerances are relative to the reference's largest magnitude; each test prints its error.

mod common;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{fixture, max_abs, max_abs_diff, tiny_fixture_vit};
use liederiv::config::{InitConfig, InitWeights, MaeConfig, Pool, PosEmbed, VitConfig, WeightFormat};
use liederiv::jvp::Tape;
use liederiv::lie::{lee_per_image, lee_split, LeeOutput, LeeSpec, Statistic};
use liederiv::models::mae::{Mae, Masking};
use liederiv::models::vit::{sincos_pos_embed, Vit};
use liederiv::models::weights::{hf_to_timm, load_pretrained, read_checkpoint, Pretrained};
use liederiv::models::{Model, Readout};
use liederiv::transforms::{Stencil, Transform};
use std::collections::HashMap;
use std::path::Path;

/// Reference inputs and outputs in their stored dtypes (`read_checkpoint` would round the f64 LEE
/// to f32).
fn io(dir: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(&format!("{dir}/io.safetensors")), &Device::Cpu).unwrap()
}

fn file_init(path: &Path, format: WeightFormat) -> InitConfig {
    InitConfig {
        weights: InitWeights::File,
        file: path.display().to_string(),
        format,
        ..InitConfig::default()
    }
}

/// Our ViT (28 px, 1 channel, 10 classes) on the loaded tensors; absent ones (a fresh head) are
/// initialised.
fn build_vit(pre: &Pretrained, vit: &VitConfig) -> Vit {
    let vm = VarMap::new();
    pre.insert_into(&vm, &Device::Cpu).unwrap();
    Vit::new(vit, 28, 1, 10, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap()
}

/// max |got − want| / max |want| below `tol`.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let err = max_abs_diff(got, want) / max_abs(want);
    eprintln!("{what}: max |ours - reference| / max |reference| = {err:.2e}");
    assert!(err < tol, "{what}: relative error {err:e} >= {tol:e}");
}

/// The encoder's output after its final LayerNorm, all tokens `(B, 1 + N, D)`: the cls-pooling
/// ViT's `norm` step as the capture tape records it.
fn last_hidden_state(vit: &Vit, x: &Tensor) -> Tensor {
    let dx = x.zeros_like().unwrap().unsqueeze(0).unwrap();
    let mut tape = Tape::capture();
    vit.jvp_at(x, &dx, &mut tape, Readout::Logits).unwrap();
    let norm = tape
        .captured()
        .iter()
        .find(|c| c.name == "norm")
        .expect("a `norm` step");
    norm.y.clone()
}

#[test]
fn transformers_vit_for_image_classification_logits() {
    let io = io("transformers_vit_cls");
    let init = file_init(&fixture("transformers_vit_cls/model.safetensors"), WeightFormat::Hf);
    let vit = tiny_fixture_vit(Pool::Cls, PosEmbed::Learned);
    let pre = load_pretrained(&init, &vit, 28, 1, 10).unwrap();
    assert!(pre.notes.is_empty(), "{:?}", pre.notes);
    let logits = build_vit(&pre, &vit).forward(&io["x"]).unwrap();
    assert_close("ViTForImageClassification logits", &logits, &io["logits"], 1e-5);
}

#[test]
fn transformers_vit_model_hidden_states() {
    let io = io("transformers_vit_model");
    let init = file_init(&fixture("transformers_vit_model/model.safetensors"), WeightFormat::Hf);
    let vit = tiny_fixture_vit(Pool::Cls, PosEmbed::Learned);
    let pre = load_pretrained(&init, &vit, 28, 1, 10).unwrap();
    assert_eq!(pre.notes.len(), 2, "only the pooler is dropped: {:?}", pre.notes);
    let model = build_vit(&pre, &vit);
    let x = &io["x"];
    assert_close(
        "ViTModel last_hidden_state",
        &last_hidden_state(&model, x),
        &io["last_hidden_state"],
        1e-5,
    );
    // The last layer's patch tokens before the final LayerNorm (hidden_states[-1] without cls).
    let dx = x.zeros_like().unwrap().unsqueeze(0).unwrap();
    let tokens = model.jvp_at(x, &dx, &mut Tape::off(), Readout::Tokens).unwrap().y;
    let want = io["tokens"].narrow(1, 1, 16).unwrap();
    assert_close("ViTModel hidden_states[-1] patch tokens", &tokens, &want, 1e-5);
}

/// `decoder.decoder_encoder.layer.N` (transformers 5.x `save_pretrained`) renamed to the Hub's
/// `decoder.decoder_layers.N` (facebook/vit-mae-base).
fn hub_decoder_layout(ckpt: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    ckpt.iter()
        .map(|(k, t)| {
            (
                k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."),
                t.clone(),
            )
        })
        .collect()
}

fn mae_checkpoint() -> HashMap<String, Tensor> {
    read_checkpoint(&fixture("transformers_vit_mae/model.safetensors")).unwrap()
}

#[test]
fn transformers_mae_both_decoder_layouts_load() {
    let saved = mae_checkpoint();
    assert!(
        saved.keys().any(|k| k.starts_with("decoder.decoder_encoder.layer.1.")),
        "the fixture should be in transformers 5.x's layout"
    );
    let hub = hub_decoder_layout(&saved);
    assert!(hub.keys().any(|k| k.starts_with("decoder.decoder_layers.1.")));
    let a = hf_to_timm(saved).unwrap().tensors;
    let b = hf_to_timm(hub).unwrap().tensors;
    let mut keys: Vec<&String> = a.keys().collect();
    keys.sort();
    let mut keys_b: Vec<&String> = b.keys().collect();
    keys_b.sort();
    assert_eq!(keys, keys_b);
    for k in &keys {
        assert_eq!(max_abs_diff(&a[*k], &b[*k]), 0.0, "{k}");
    }
    for i in 0..2 {
        for p in ["attn.qkv.weight", "attn.proj.bias", "mlp.fc2.weight", "norm2.bias"] {
            assert!(
                a.contains_key(&format!("decoder_blocks.{i}.{p}")),
                "decoder_blocks.{i}.{p}"
            );
        }
    }

    // The encoder, through the config path into our classifier (decoder dropped), gives
    // ViTMAEModel's last_hidden_state at mask ratio 0 with ordered noise (nothing shuffled).
    let io = io("transformers_vit_mae");
    let init = file_init(&fixture("transformers_vit_mae/model.safetensors"), WeightFormat::Hf);
    let vit = tiny_fixture_vit(Pool::Cls, PosEmbed::Learned);
    let pre = load_pretrained(&init, &vit, 28, 1, 10).unwrap();
    assert_close(
        "ViTMAEModel last_hidden_state, mask ratio 0",
        &last_hidden_state(&build_vit(&pre, &vit), &io["x"]),
        &io["r0_last_hidden_state"],
        1e-5,
    );
}

/// Our MAE on the transformers checkpoint (Hub layout, so both layouts are exercised), with fixed
/// sin-cos position embeddings as ViTMAE has.
fn our_mae(norm_pix_loss: bool) -> Mae {
    let tensors = hf_to_timm(hub_decoder_layout(&mae_checkpoint())).unwrap().tensors;
    let mae = MaeConfig {
        decoder_dim: 16,
        decoder_depth: 2,
        decoder_heads: 2,
        mask_ratio: 0.75,
        norm_pix_loss,
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Mae::new(&tiny_fixture_vit(Pool::Cls, PosEmbed::Sincos), &mae, 28, 1, vb).unwrap()
}

fn noise(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

#[test]
fn transformers_mae_reconstruction_and_loss() {
    let io = io("transformers_vit_mae");
    let x = &io["x"];

    // Our sin-cos tables are transformers' (the checkpoint stores them as fixed buffers).
    let ckpt = hf_to_timm(mae_checkpoint()).unwrap().tensors;
    let dev = Device::Cpu;
    let enc = sincos_pos_embed(32, 4, 4, DType::F32, &dev).unwrap();
    let dec = sincos_pos_embed(16, 4, 4, DType::F32, &dev).unwrap();
    assert!(max_abs_diff(&enc, &ckpt["pos_embed"]) < 1e-6);
    assert!(max_abs_diff(&dec, &ckpt["decoder_pos_embed"]) < 1e-6);

    let mae = our_mae(false);
    // Mask ratio 0, ordered noise: every patch reconstructed in place.
    let all = Masking::from_noise(&noise(&io["ordered_noise"]), 16);
    let pred = mae.reconstruct(x, &all).unwrap();
    assert_close("ViTMAE logits, mask ratio 0", &pred, &io["r0_logits"], 1e-5);

    // Mask ratio 0.75 on transformers' noise: the same mask, reconstruction and loss.
    let masking = Masking::from_noise(&noise(&io["noise"]), mae.keep_count());
    let mask = Tensor::from_vec(masking.mask.concat(), (4, 16), &dev).unwrap();
    assert_eq!(max_abs_diff(&mask, &io["r75_mask"]), 0.0, "mask");
    let pred = mae.reconstruct(x, &masking).unwrap();
    assert_close("ViTMAE logits, mask ratio 0.75", &pred, &io["r75_logits"], 1e-5);
    for (norm_pix, key) in [(false, "r75_loss"), (true, "r75_loss_norm_pix")] {
        let ours = scalar(&our_mae(norm_pix).loss_with(x, &masking).unwrap());
        let want = scalar(&io[key]);
        let rel = (ours - want).abs() / want.abs();
        eprintln!("ViTMAE loss (norm_pix_loss {norm_pix}): ours {ours} transformers {want}, rel {rel:.2e}");
        assert!(
            rel < 1e-5,
            "loss with norm_pix_loss = {norm_pix}: ours {ours}, transformers {want}"
        );
    }
}

fn timm_avg(dtype: DType) -> (Vit, HashMap<String, Tensor>) {
    let init = file_init(&fixture("timm_vit_avg/model.safetensors"), WeightFormat::Timm);
    let vit = tiny_fixture_vit(Pool::Mean, PosEmbed::Learned);
    let pre = load_pretrained(&init, &vit, 28, 1, 10).unwrap();
    assert!(pre.notes.is_empty(), "{:?}", pre.notes);
    let tensors = pre
        .tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
        .collect();
    let model = Vit::new(&vit, 28, 1, 10, VarBuilder::from_tensors(tensors, dtype, &Device::Cpu)).unwrap();
    let io = io("timm_vit_avg")
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
        .collect();
    (model, io)
}

#[test]
fn timm_mean_pooling_logits() {
    let (vit, io) = timm_avg(DType::F32);
    let logits = vit.forward(&io["x"]).unwrap();
    assert_close("timm global_pool=avg logits", &logits, &io["logits"], 1e-5);
}

#[test]
fn timm_mean_pooling_lee_f64() {
    let (vit, io) = timm_avg(DType::F64);
    let trs = [Transform::Rotate, Transform::TranslateX, Transform::Scale];
    let ours = lee_per_image(&vit, &io["x"], &trs, Stencil::Central, Statistic::Sq, LeeOutput::Probs).unwrap();
    for (t, tr) in trs.iter().enumerate() {
        let want: Vec<f64> = io[&format!("lee_{}", tr.name())].to_vec1().unwrap();
        for (a, b) in ours[t].iter().zip(&want) {
            let rel = (a - b).abs() / b.abs();
            eprintln!("timm avg LEE {tr}: ours {a:e} timm {b:e} rel {rel:.2e}");
            assert!(rel < 1e-12, "{tr}: ours {a:e}, timm {b:e}");
        }
    }
}

/// `lee.output = "features" | "tokens"` against timm: the readouts themselves, the head that
/// maps the features to the logits (logits = features · Wᵀ + b), and the LEE of each readout per
/// image and over the split (`lee_split`, with its scale-free form: divided by the mean over
/// images of (1/M)·Σ y²), all in f64.
#[test]
fn timm_features_and_tokens_and_their_lee_f64() {
    let (vit, io) = timm_avg(DType::F64);
    let timm = io_file("timm_vit_avg/outputs.safetensors");
    let x = &io["x"];
    let dx = x.zeros_like().unwrap().unsqueeze(0).unwrap();
    let trs = [Transform::Rotate, Transform::TranslateX, Transform::Scale];
    for (output, at, name) in [
        (LeeOutput::Features, Readout::Features, "features"),
        (LeeOutput::Tokens, Readout::Tokens, "tokens"),
    ] {
        let r = vit.jvp_at(x, &dx, &mut Tape::off(), at).unwrap();
        let want = &timm[name];
        let err = max_abs_diff(&r.y, want) / max_abs(want);
        eprintln!("timm {name}: max |ours - timm| / max |timm| = {err:.2e}");
        assert!(err < 1e-12, "{name}: relative error {err:e}");
        assert!(max_abs_diff(&r.logits, &timm["logits"]) < 1e-12 * max_abs(&timm["logits"]));

        let ours = lee_per_image(&vit, x, &trs, Stencil::Central, Statistic::Sq, output).unwrap();
        let spec = LeeSpec {
            transforms: trs.to_vec(),
            stencil: Stencil::Central,
            statistic: Statistic::Sq,
            output,
            batch_size: 3,
        };
        let entries = lee_split(&vit, x, None, &spec).unwrap().entries();
        let flat = want.flatten_from(1).unwrap();
        let scale: f64 = flat
            .sqr()
            .unwrap()
            .mean(1)
            .unwrap()
            .mean(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        for (t, tr) in trs.iter().enumerate() {
            let want: Vec<f64> = timm[&format!("lee_{name}_{}", tr.name())].to_vec1().unwrap();
            for (a, b) in ours[t].iter().zip(&want) {
                let rel = (a - b).abs() / b.abs();
                assert!(rel < 1e-10, "{name} {tr}: ours {a:e}, timm {b:e}");
            }
            let mean = want.iter().sum::<f64>() / want.len() as f64;
            let (raw, scaled) = (&entries[t], &entries[t + trs.len()]);
            assert_eq!((raw.name.as_str(), raw.n), (tr.name(), 4));
            assert_eq!(scaled.name, format!("{}_scaled", tr.name()));
            let (e_raw, e_scaled) = (
                (raw.mean - mean).abs() / mean,
                (scaled.mean - mean / scale).abs() / (mean / scale),
            );
            eprintln!(
                "timm {name} LEE {tr}: {:e} (scale-free {:e}), relative error {e_raw:.1e} / {e_scaled:.1e}",
                raw.mean, scaled.mean
            );
            assert!(
                e_raw < 1e-10 && e_scaled < 1e-10,
                "{name} {tr}: {raw:?} {scaled:?} vs {mean:e} / {scale:e}"
            );
        }
    }
    // The head: our features through the head's weight and bias are our logits (and timm's).
    let features = vit.jvp_at(x, &dx, &mut Tape::off(), Readout::Features).unwrap().y;
    let file = io_file("timm_vit_avg/model.safetensors");
    let (w, b) = (
        file["head.weight"].to_dtype(DType::F64).unwrap(),
        file["head.bias"].to_dtype(DType::F64).unwrap(),
    );
    let through = features.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
    let logits = vit.forward(x).unwrap();
    let err = max_abs_diff(&through, &logits) / max_abs(&logits);
    eprintln!("features · Wᵀ + b vs our logits: {err:.2e}");
    assert!(err < 1e-13, "features · Wᵀ + b vs logits: {err:e}");
    assert!(max_abs_diff(&logits, &timm["logits"]) < 1e-12 * max_abs(&logits));
}

fn io_file(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}
