//! A trained model back in the Python world: its weights in timm's or transformers' key layout,
//! with what each library needs beside them to rebuild the model without a conversion script of
//! the user's own (timm: its own model folder `config.json`, which
//! `timm.create_model("local-dir:<folder>", pretrained=True)` reads, and the `timm.create_model`
//! arguments; transformers, ViTs only: a `config.json` that
//! `ViTForImageClassification.from_pretrained` accepts, and a `preprocessor_config.json` with
//! the input normalisation).
//!
//! Our ViT, ResNet and ConvNeXt variables already carry timm's names and shapes, so the timm
//! export is the variables themselves (a conv-MLP ConvNeXt's linear weights as the 1×1 convs timm
//! stores); the transformers
//! export is [`timm_to_hf`], the inverse of `weights::hf_to_timm`. A fixed sin-cos position
//! embedding is no variable here but a parameter in both libraries: it is written out.

use super::vit::sincos_pos_embed;
use super::weights::{WeightsError, HF_BLOCK_MODULES, HF_ENCODER_KEYS, HF_ENCODER_PREFIXES, HF_QKV};
use crate::config::{Config, ModelKind, Pool, PosEmbed, ResnetBlock, WeightFormat};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;

/// timm's LayerNorm epsilon: `create_model` has no argument for another one.
const TIMM_LN_EPS: f64 = 1e-6;

/// Why a model cannot be exported in a format.
fn refuse(message: String) -> WeightsError {
    WeightsError::Export { message }
}

/// The model's tensors in `format`'s key layout (f32, CPU), checked exportable first: a ViT,
/// ResNet or ConvNeXt (the CNN and G-CNN have no layout outside this project), transformers for
/// ViTs only, with cls pooling (its `ViTForImageClassification` reads the cls token only),
/// timm's LayerNorm epsilon for a timm ViT.
pub fn export_tensors(
    cfg: &Config,
    varmap: &VarMap,
    format: WeightFormat,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    let v = &cfg.model.vit;
    match cfg.model.kind {
        ModelKind::Cnn | ModelKind::Gcnn => {
            return Err(refuse(format!(
                "model.kind = \"{}\" has no layout outside liederiv (timm knows our ViT, ResNet and ConvNeXt); \
                 its checkpoint (checkpoint.safetensors, our own layout, read with safetensors) is the export",
                cfg.model.kind
            )))
        }
        ModelKind::Resnet | ModelKind::Convnext if format == WeightFormat::Hf => {
            return Err(refuse(format!(
                "model.kind = \"{}\" exports in timm's layout only (--format timm); transformers' ResNet / \
                 ConvNeXt classes name and split their weights differently",
                cfg.model.kind
            )))
        }
        _ => {}
    }
    if cfg.model.average_rotations > 1 {
        return Err(refuse(format!(
            "model.average_rotations = {} averages the logits over rotated copies, which neither timm nor \
             transformers does; export with --set model.average_rotations=0 (the same weights) and \
             average over the rotations in Python",
            cfg.model.average_rotations
        )));
    }
    let standard = v.class_token && v.reg_tokens == 0 && !v.no_embed_class && !v.pre_norm && !v.distilled;
    match format {
        WeightFormat::Hf if cfg.model.kind == ModelKind::Vit && (!standard || v.init_values > 0.0) => {
            return Err(refuse(
                "transformers' ViTForImageClassification has no register or distillation tokens, layer scale, \
                 pre-norm or position embedding without the class slot; export this ViT with --format timm"
                    .into(),
            ))
        }
        WeightFormat::Hf if v.pool == Pool::Mean => {
            return Err(refuse(
                "transformers' ViTForImageClassification classifies from the cls token only, and this ViT \
                 mean-pools its patch tokens (model.vit.pool = \"mean\"); export it with --format timm \
                 (global_pool=\"avg\", fc_norm), or train with pool = \"cls\" for transformers"
                    .into(),
            ))
        }
        WeightFormat::Timm if cfg.model.kind == ModelKind::Vit && (v.ln_eps - TIMM_LN_EPS).abs() > 1e-15 => {
            return Err(refuse(format!(
                "timm.create_model builds LayerNorms with eps 1e-6 and this ViT uses model.vit.ln_eps = {:e}; \
                 export with --format hf (layer_norm_eps is a config field there)",
                v.ln_eps
            )))
        }
        WeightFormat::Liederiv => {
            return Err(refuse(
                "--format liederiv is the checkpoint itself; choose timm or hf".into(),
            ))
        }
        _ => {}
    }
    let data = varmap
        .data()
        .lock()
        .map_err(|_| WeightsError::Candle(candle_core::Error::Msg("VarMap lock poisoned".into())))?;
    let mut tensors = HashMap::new();
    for (name, var) in data.iter() {
        let t = var.as_tensor().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        tensors.insert(name.clone(), t);
    }
    if cfg.model.kind == ModelKind::Convnext && cfg.model.convnext.conv_mlp {
        // timm's ConvMlp keeps fc1 / fc2 as 1×1 convs: (out, in) → (out, in, 1, 1).
        for (name, t) in tensors.iter_mut() {
            if name.contains(".mlp.fc") && name.ends_with(".weight") {
                *t = t.unsqueeze(2)?.unsqueeze(3)?;
            }
        }
    }
    if cfg.model.kind == ModelKind::Vit && v.pos_embed == PosEmbed::Sincos {
        // The fixed table with zero slots for the prefix tokens it covers (none with
        // no_embed_class), as `models::vit::pos_embed` builds it.
        let (g, n) = grid(cfg);
        let embedded = if v.no_embed_class { 0 } else { v.prefix_tokens() };
        let patches = sincos_pos_embed(v.dim, g, g, DType::F32, &Device::Cpu)?.narrow(1, 1, n)?;
        let zeros = Tensor::zeros((1, embedded, v.dim), DType::F32, &Device::Cpu)?;
        tensors.insert("pos_embed".into(), Tensor::cat(&[&zeros, &patches], 1)?);
    }
    match format {
        WeightFormat::Hf => timm_to_hf(tensors),
        _ => Ok(tensors),
    }
}

/// Token grid side and patch count.
fn grid(cfg: &Config) -> (usize, usize) {
    let g = cfg.data.image_size / cfg.model.vit.patch_size;
    (g, g * g)
}

/// Our (timm) names → transformers' `ViTForImageClassification` names; the fused `qkv` of each
/// block is split into query, key and value (rows q | k | v).
pub fn timm_to_hf(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, WeightsError> {
    let mut out = HashMap::new();
    for (key, t) in tensors {
        if let Some(rest) = key.strip_prefix("blocks.") {
            let (i, rest) = rest.split_once('.').ok_or_else(|| unknown(&key))?;
            let (module, param) = rest.rsplit_once('.').ok_or_else(|| unknown(&key))?;
            let layer = format!("vit.encoder.layer.{i}");
            if module == "attn.qkv" {
                let d = t.dim(0)? / 3;
                for (k, part) in HF_QKV.iter().enumerate() {
                    out.insert(
                        format!("{layer}.attention.attention.{part}.{param}"),
                        t.narrow(0, k * d, d)?.contiguous()?,
                    );
                }
                continue;
            }
            let (hf, _) = HF_BLOCK_MODULES
                .iter()
                .find(|(_, ours)| *ours == module)
                .ok_or_else(|| unknown(&key))?;
            out.insert(format!("{layer}.{hf}.{param}"), t);
            continue;
        }
        let hf = HF_ENCODER_KEYS
            .iter()
            .find(|(_, ours)| *ours == key)
            .map(|(hf, _)| hf.to_string())
            .or_else(|| {
                HF_ENCODER_PREFIXES
                    .iter()
                    .find_map(|(hf, ours)| key.strip_prefix(ours).map(|p| format!("{hf}{p}")))
            })
            .ok_or_else(|| unknown(&key))?;
        // ViTForImageClassification keeps its classifier beside the `vit.` encoder.
        let hf = if hf.starts_with("classifier.") {
            hf
        } else {
            format!("vit.{hf}")
        };
        out.insert(hf, t);
    }
    Ok(out)
}

fn unknown(key: &str) -> WeightsError {
    refuse(format!("{key}: no transformers name for this tensor"))
}

/// The `config.json` of `ViTForImageClassification` for this model (transformers' ViTConfig
/// fields; `layer_norm_eps` written out, its default being 1e-12).
pub fn hf_config(cfg: &Config) -> serde_json::Value {
    let v = &cfg.model.vit;
    let k = cfg.model.num_classes;
    let id2label: serde_json::Map<String, serde_json::Value> =
        (0..k).map(|i| (i.to_string(), format!("LABEL_{i}").into())).collect();
    let label2id: serde_json::Map<String, serde_json::Value> =
        (0..k).map(|i| (format!("LABEL_{i}"), i.into())).collect();
    serde_json::json!({
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "hidden_size": v.dim,
        "num_hidden_layers": v.depth,
        "num_attention_heads": v.heads,
        "intermediate_size": (v.mlp_ratio * v.dim as f64).round() as usize,
        "hidden_act": "gelu",
        "layer_norm_eps": v.ln_eps,
        "image_size": cfg.data.image_size,
        "patch_size": v.patch_size,
        "num_channels": cfg.data.channels,
        "qkv_bias": v.qkv_bias,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "encoder_stride": v.patch_size,
        "id2label": id2label,
        "label2id": label2id,
    })
}

/// `preprocessor_config.json` for transformers' `ViTImageProcessor`: pixels / 255, then the
/// config's normalisation, no resize (images are already `data.image_size`).
pub fn hf_preprocessor(cfg: &Config) -> serde_json::Value {
    let c = cfg.data.channels;
    serde_json::json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": false,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": (0..c).map(|i| cfg.data.mean.get(i)).collect::<Vec<_>>(),
        "image_std": (0..c).map(|i| cfg.data.std.get(i)).collect::<Vec<_>>(),
    })
}

/// The timm model name and the keyword arguments of `timm.create_model(name, pretrained=False,
/// **args)` that rebuild this model (the name only supplies defaults these override).
pub fn timm_model(cfg: &Config) -> (&'static str, serde_json::Value) {
    let (c, k) = (cfg.data.channels, cfg.model.num_classes);
    match cfg.model.kind {
        ModelKind::Resnet => {
            let r = &cfg.model.resnet;
            let name = match r.block {
                ResnetBlock::Basic => "resnet18",
                ResnetBlock::Bottleneck => "resnet50",
            };
            (
                name,
                serde_json::json!({
                    "layers": r.layers,
                    "channels": r.channels,
                    "in_chans": c,
                    "num_classes": k,
                    "drop_path_rate": r.drop_path_rate,
                }),
            )
        }
        ModelKind::Convnext => {
            let n = &cfg.model.convnext;
            (
                "convnext_atto",
                serde_json::json!({
                    "depths": n.depths,
                    "dims": n.dims,
                    "patch_size": n.patch_size,
                    "kernel_sizes": n.kernel_sizes,
                    "conv_mlp": n.conv_mlp,
                    "ls_init_value": (n.ls_init_value > 0.0).then_some(n.ls_init_value),
                    "norm_eps": n.norm_eps,
                    "drop_path_rate": n.drop_path_rate,
                    "in_chans": c,
                    "num_classes": k,
                }),
            )
        }
        _ => {
            let v = &cfg.model.vit;
            let name = if v.distilled {
                "deit_tiny_distilled_patch16_224"
            } else {
                "vit_tiny_patch16_224"
            };
            let mut args = serde_json::json!({
                    "img_size": cfg.data.image_size,
                    "patch_size": v.patch_size,
                    "in_chans": c,
                    "num_classes": k,
                    "embed_dim": v.dim,
                    "depth": v.depth,
                    "num_heads": v.heads,
                    "mlp_ratio": v.mlp_ratio,
                    "qkv_bias": v.qkv_bias,
                    "class_token": v.class_token,
                    "global_pool": match v.pool { Pool::Cls => "token", Pool::Mean => "avg" },
            });
            // timm's options only where they are on: the plain layout keeps its old arguments.
            let options = [
                ("reg_tokens", v.reg_tokens > 0, serde_json::json!(v.reg_tokens)),
                ("no_embed_class", v.no_embed_class, serde_json::json!(true)),
                ("pre_norm", v.pre_norm, serde_json::json!(true)),
                ("init_values", v.init_values > 0.0, serde_json::json!(v.init_values)),
            ];
            for (key, on, value) in options {
                if on {
                    args[key] = value;
                }
            }
            (name, args)
        }
    }
}

/// The keyword arguments of [`timm_model`] (`timm_args.json`).
pub fn timm_args(cfg: &Config) -> serde_json::Value {
    timm_model(cfg).1
}

/// timm's own model-folder `config.json` (the layout `timm.models.push_to_hf_hub` writes):
/// `architecture`, `num_classes`, `model_args` and a `pretrained_cfg` with the input size and
/// normalisation, so that `timm.create_model("local-dir:<folder>", pretrained=True)` rebuilds
/// the model and loads `model.safetensors` beside it, and `timm.data.resolve_data_config`
/// preprocesses as we do.
pub fn timm_config(cfg: &Config) -> serde_json::Value {
    let (architecture, args) = timm_model(cfg);
    let (c, k, size) = (cfg.data.channels, cfg.model.num_classes, cfg.data.image_size);
    let (first_conv, classifier) = match cfg.model.kind {
        ModelKind::Resnet => ("conv1", serde_json::json!("fc")),
        ModelKind::Convnext => ("stem.0", serde_json::json!("head.fc")),
        _ if cfg.model.vit.distilled => ("patch_embed.proj", serde_json::json!(["head", "head_dist"])),
        _ => ("patch_embed.proj", serde_json::json!("head")),
    };
    serde_json::json!({
        "architecture": architecture,
        "num_classes": k,
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [c, size, size],
            "mean": (0..c).map(|i| cfg.data.mean.get(i)).collect::<Vec<_>>(),
            "std": (0..c).map(|i| cfg.data.std.get(i)).collect::<Vec<_>>(),
            "crop_pct": cfg.data.crop_pct,
            "interpolation": cfg.data.interpolation.name(),
            "num_classes": k,
            "first_conv": first_conv,
            "classifier": classifier,
        },
    })
}
