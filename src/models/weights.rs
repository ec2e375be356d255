//! Pretrained ViT weights: read a Hugging Face (`ViTModel` / `ViTMAEModel`) or timm checkpoint,
//! rename its tensors to our (timm) parameter names, adapt them to the model we are about to build
//! (input channels, position-embedding grid, class count) and check every shape against it.
//!
//! Owns the key maps and the checked loading of MAE's fine-tuning recipe
//! (facebookresearch/mae `main_finetune.py`: drop a head whose shape differs, interpolate the
//! position embeddings, then require that the only missing keys are the new head / fc_norm).
//! It does not own the network (`models::vit`), the Hub client (`crate::hub`) or our own
//! checkpoints (`train`). The result is a `HashMap<String, Tensor>` in our names (on the CPU, f32)
//! for the caller to insert into its `VarMap` *before* building the model, so that the new
//! weights (head, fc_norm) get initialised by the constructor (DESIGN.md, "Candle facts").
//!
//! HF names follow transformers' `modeling_vit.py` / `modeling_vit_mae.py`; the `vit.` prefix is
//! optional and the separate query / key / value projections are concatenated into timm's fused
//! `attn.qkv` (rows q | k | v).

use crate::config::{InitConfig, InitWeights, VitConfig, WeightFormat};
use crate::hub::{self, HubError, HubSource, RepoKind};
use crate::models::vit::{interpolate_pos_embed, Vit};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Parameters the fine-tuning model creates fresh when the checkpoint lacks them (MAE's
/// `assert set(msg.missing_keys) == {'head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias'}`).
const NEW_KEYS: [&str; 6] = [
    "head.weight",
    "head.bias",
    "fc_norm.weight",
    "fc_norm.bias",
    "head_dist.weight",
    "head_dist.bias",
];

/// What differs between the architectures a pretrained checkpoint can be for: the input layer
/// (adapted to the model's channels) and the classifier (fresh when its shape differs), named
/// as timm names them.
struct Family {
    input: &'static str,
    /// Prefixes of the classifiers' keys.
    heads: &'static [&'static str],
    /// Keys the model may create fresh.
    fresh: &'static [&'static str],
}

/// The family of a model, read off its own parameter names.
fn family(expected: &BTreeMap<String, Vec<usize>>) -> Family {
    if expected.contains_key("conv1.weight") {
        Family {
            input: "conv1.weight",
            heads: &["fc."],
            fresh: &["fc.weight", "fc.bias"],
        }
    } else if expected.contains_key("stem.0.weight") {
        Family {
            input: "stem.0.weight",
            heads: &["head.fc."],
            fresh: &["head.fc.weight", "head.fc.bias"],
        }
    } else {
        Family {
            input: "patch_embed.proj.weight",
            heads: &["head.", "head_dist."],
            fresh: &NEW_KEYS,
        }
    }
}

/// Everything that can go wrong turning a checkpoint into our model's tensors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    #[error("cannot read checkpoint {path}: {source}. Give a `.safetensors` file or a PyTorch `pytorch_model.bin` / `.pth` state dict.{hint}", hint = crate::hub::cache_hint(.path))]
    Read { path: PathBuf, source: candle_core::Error },
    #[error("cannot read the model config {path}: {message}")]
    HfConfig { path: PathBuf, message: String },
    #[error("checkpoint config {path} does not match model.vit; set these keys (e.g. with --set) or pick another checkpoint: {}", .mismatches.join("; "))]
    ConfigMismatch { path: PathBuf, mismatches: Vec<String> },
    #[error("cannot map the Hugging Face checkpoint to ViT names: {}", .problems.join("; "))]
    HfKeys { problems: Vec<String> },
    #[error("checkpoint does not fit the model ({} shape mismatches, {} missing, {} unexpected keys):{}{}{}",
        .mismatches.len(), .missing.len(), .unexpected.len(),
        list("shape mismatches", .mismatches), list("missing", .missing), list("unexpected", .unexpected))]
    Shapes {
        mismatches: Vec<String>,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("cannot export: {message}")]
    Export { message: String },
    #[error("init.weights = {weights:?} does not name pretrained weights (use \"hub\" or \"file\")")]
    NotPretrained { weights: String },
    #[error("init.format = {format:?}: ResNet and ConvNeXt weights load from timm state dicts only; set init.format = \"timm\" (transformers' ResNet / ConvNeXt layouts are not read)")]
    TimmOnly { format: String },
    #[error("init.format = {format:?} is not a pretrained-ViT layout here (\"hf\" or \"timm\"); our own checkpoints load through the checkpoint module")]
    Format { format: String },
    #[error("Hugging Face repo {repo:?} has neither model.safetensors ({safetensors}) nor pytorch_model.bin ({bin})")]
    HubWeights {
        repo: String,
        safetensors: Box<HubError>,
        bin: Box<HubError>,
    },
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("adapting checkpoint tensors: {0}")]
    Candle(#[from] candle_core::Error),
}

fn list(title: &str, items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" {title}: [{}].", items.join(", "))
    }
}

/// Key layout of a checkpoint (`init.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers' ViTModel / ViTMAEModel / ViTForImageClassification.
    Hf,
    /// timm's VisionTransformer (our own names).
    Timm,
}

impl Layout {
    /// `init.format` → layout; "liederiv" (our own checkpoints) is refused.
    pub fn of(format: WeightFormat) -> Result<Self, WeightsError> {
        match format {
            WeightFormat::Hf => Ok(Self::Hf),
            WeightFormat::Timm => Ok(Self::Timm),
            WeightFormat::Liederiv => Err(WeightsError::Format {
                format: format.name().into(),
            }),
        }
    }
}

/// Tensors in our names plus what was done to them, for the caller to print.
#[derive(Debug)]
pub struct Pretrained {
    pub tensors: HashMap<String, Tensor>,
    /// One line per adaptation or dropped key ("dropped pooler.dense.weight: not used by ViT").
    pub notes: Vec<String>,
}

impl Pretrained {
    /// Insert every tensor into `vm` as a trainable `Var` on `device`, replacing any of the same
    /// name. Do this *before* building the model on `vm`: the constructor then reuses these and
    /// initialises only what is absent (the new head / fc_norm).
    pub fn insert_into(&self, vm: &VarMap, device: &Device) -> Result<(), WeightsError> {
        let mut data = vm
            .data()
            .lock()
            .map_err(|_| WeightsError::Candle(candle_core::Error::Msg("VarMap lock poisoned".into())))?;
        for (name, t) in &self.tensors {
            data.insert(name.clone(), Var::from_tensor(&t.to_device(device)?)?);
        }
        Ok(())
    }
}

/// Read every tensor of a checkpoint file as f32 on the CPU: `.safetensors`, or a PyTorch pickle
/// (`pytorch_model.bin`, `.pth`, `.pt`; a `{"model": state_dict}` wrapper as MAE saves is unwrapped).
pub fn read_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    let read = |e| WeightsError::Read {
        path: path.to_path_buf(),
        source: e,
    };
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let raw: Vec<(String, Tensor)> = if is_safetensors {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(read)?
            .into_iter()
            .collect()
    } else {
        let plain = candle_core::pickle::read_all(path).map_err(read)?;
        if plain.is_empty() {
            candle_core::pickle::read_all_with_key(path, Some("model")).map_err(read)?
        } else {
            plain
        }
    };
    raw.into_iter().map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?))).collect()
}

/// A transformers block's sub-modules and ours (timm's), both ways (loading and `export`).
pub const HF_BLOCK_MODULES: [(&str, &str); 5] = [
    ("attention.output.dense", "attn.proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
];
/// The three transformers projections that make timm's fused `qkv`, in its row order.
pub const HF_QKV: [&str; 3] = ["query", "key", "value"];
/// Encoder tensors outside the blocks: (transformers name without `vit.`, ours).
pub const HF_ENCODER_KEYS: [(&str, &str); 2] = [
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
];
/// DeiT's and DINOv2's further tensors and modules (loading only): the distillation token and
/// its classifier, register tokens, and DINOv2's block modules (timm's names there already, plus
/// its layer scale `layer_scale{1,2}.lambda1`).
const HF_DEIT_DINOV2_KEYS: [(&str, &str); 2] = [
    ("embeddings.distillation_token", "dist_token"),
    ("embeddings.register_tokens", "reg_token"),
];
const HF_DEIT_DINOV2_PREFIXES: [(&str, &str); 2] =
    [("cls_classifier.", "head."), ("distillation_classifier.", "head_dist.")];
const HF_DINOV2_BLOCK_MODULES: [(&str, &str); 6] = [
    ("norm1", "norm1"),
    ("norm2", "norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
    ("layer_scale1", "ls1"),
    ("layer_scale2", "ls2"),
];
/// The prefixes of a transformers classifier's encoder: ViT, DeiT, DINOv2.
const HF_MODEL_PREFIXES: [&str; 3] = ["vit.", "deit.", "dinov2."];
/// Encoder modules outside the blocks, as name prefixes: (transformers without `vit.`, ours).
pub const HF_ENCODER_PREFIXES: [(&str, &str); 3] = [
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("layernorm.", "norm."),
    ("classifier.", "head."),
];

/// Prefixes of ViTMAEForPreTraining's decoder layers: the Hub's checkpoints (facebook/vit-mae-*)
/// have `decoder.decoder_layers.N`, transformers 5.x's `save_pretrained` writes
/// `decoder.decoder_encoder.layer.N`; both hold the same modules.
pub const HF_DECODER_LAYERS: [&str; 2] = ["decoder.decoder_layers.", "decoder.decoder_encoder.layer."];

/// Rename a Hugging Face ViT / ViTMAE / DeiT / DINOv2 checkpoint to our names. Encoder keys may
/// carry the `vit.` (`deit.`, `dinov2.`) prefix or not; DeiT's distillation token and classifiers
/// map to `dist_token`, `head`, `head_dist`, DINOv2's register tokens to `reg_token` and its
/// layer scale to `ls1` / `ls2` `gamma`; `decoder.*` (ViTMAEForPreTraining) maps to `decoder_embed`, `mask_token`,
/// `decoder_pos_embed`, `decoder_blocks.{i}.*` (from either of [`HF_DECODER_LAYERS`]), `decoder_norm`, `decoder_pred`; `classifier` maps
/// to `head`. The pooler and a ViTModel's `embeddings.mask_token` are dropped (with a note).
pub fn hf_to_timm(ckpt: HashMap<String, Tensor>) -> Result<Pretrained, WeightsError> {
    let mut tensors = HashMap::new();
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    // (our block prefix, "weight" | "bias") -> [q, k, v]
    let mut qkv: BTreeMap<(String, String), [Option<Tensor>; 3]> = BTreeMap::new();
    for (key, t) in ckpt {
        let k = HF_MODEL_PREFIXES
            .iter()
            .find_map(|p| key.strip_prefix(p))
            .unwrap_or(&key);
        let block = |rest: &str, ours: String| -> Option<(String, Option<(usize, String)>)> {
            // (name in our layout, or a q/k/v part: (index, param) under `ours`)
            let (head, param) = rest.rsplit_once('.')?;
            if let Some(i) = head
                .strip_prefix("attention.attention.")
                .and_then(|p| HF_QKV.iter().position(|q| *q == p))
            {
                return Some((ours, Some((i, param.to_string()))));
            }
            if let Some((_, renamed)) = HF_BLOCK_MODULES.iter().find(|(hf, _)| *hf == head) {
                return Some((format!("{ours}.{renamed}.{param}"), None));
            }
            let (_, renamed) = HF_DINOV2_BLOCK_MODULES.iter().find(|(hf, _)| *hf == head)?;
            // DINOv2's layer scale is `lambda1`, timm's `gamma`.
            let param = if param == "lambda1" { "gamma" } else { param };
            Some((format!("{ours}.{renamed}.{param}"), None))
        };
        let mapped: Option<(String, Option<(usize, String)>)> = if let Some(rest) = k.strip_prefix("encoder.layer.") {
            rest.split_once('.').and_then(|(i, r)| block(r, format!("blocks.{i}")))
        } else if let Some(rest) = HF_DECODER_LAYERS.iter().find_map(|p| k.strip_prefix(p)) {
            rest.split_once('.')
                .and_then(|(i, r)| block(r, format!("decoder_blocks.{i}")))
        } else if k.starts_with("pooler.") || k == "embeddings.mask_token" {
            notes.push(format!("dropped {key}: not used by ViT"));
            continue;
        } else {
            let keys = HF_ENCODER_KEYS.iter().chain(&HF_DEIT_DINOV2_KEYS).chain(&[
                ("decoder.mask_token", "mask_token"),
                ("decoder.decoder_pos_embed", "decoder_pos_embed"),
            ]);
            let prefixes = HF_ENCODER_PREFIXES.iter().chain(&HF_DEIT_DINOV2_PREFIXES).chain(&[
                ("decoder.decoder_embed.", "decoder_embed."),
                ("decoder.decoder_norm.", "decoder_norm."),
                ("decoder.decoder_pred.", "decoder_pred."),
            ]);
            let plain = keys
                .clone()
                .find(|(hf, _)| *hf == k)
                .map(|(_, ours)| ours.to_string())
                .or_else(|| {
                    prefixes
                        .clone()
                        .find_map(|(from, to)| k.strip_prefix(from).map(|p| format!("{to}{p}")))
                });
            plain.map(|name| (name, None))
        };
        match mapped {
            Some((prefix, Some((i, param)))) => {
                qkv.entry((prefix, param)).or_default()[i] = Some(t);
            }
            Some((name, None)) => {
                tensors.insert(name, t);
            }
            None => problems.push(format!("unrecognised key {key}")),
        }
    }
    for ((prefix, param), parts) in qkv {
        match parts {
            [Some(q), Some(k), Some(v)] => {
                // three (D, D) / (D,) -> (3D, D) / (3D,), rows q | k | v as timm's fused qkv
                let fused = Tensor::cat(&[&q, &k, &v], 0)?;
                tensors.insert(format!("{prefix}.attn.qkv.{param}"), fused);
            }
            _ => {
                let absent: Vec<&str> = HF_QKV
                    .iter()
                    .zip(&parts)
                    .filter(|(_, p)| p.is_none())
                    .map(|(n, _)| *n)
                    .collect();
                problems.push(format!("{prefix}: attention {param} lacks {}", absent.join(", ")));
            }
        }
    }
    if problems.is_empty() {
        notes.sort();
        Ok(Pretrained { tensors, notes })
    } else {
        problems.sort();
        Err(WeightsError::HfKeys { problems })
    }
}

/// The subset of transformers' `ViTConfig` / `ViTMAEConfig` (config.json) that fixes the encoder's
/// shape. Missing fields take transformers' defaults (ViT-Base/16 at 224).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct HfVitConfig {
    /// "vit", "vit_mae", "deit", "dinov2", "dinov2_with_registers".
    pub model_type: String,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
    /// DINOv2 gives the MLP width as a ratio instead of `intermediate_size`.
    pub mlp_ratio: Option<f64>,
    /// DINOv2's SwiGLU MLP (the giant models), which our ViT does not build.
    pub use_swiglu_ffn: bool,
    /// DINOv2 with registers.
    pub num_register_tokens: usize,
}

impl Default for HfVitConfig {
    fn default() -> Self {
        Self {
            model_type: "vit".into(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            patch_size: 16,
            image_size: 224,
            num_channels: 3,
            qkv_bias: true,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            mlp_ratio: None,
            use_swiglu_ffn: false,
            num_register_tokens: 0,
        }
    }
}

impl HfVitConfig {
    /// Parse a `config.json`; unknown fields are ignored (transformers writes dozens).
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let err = |message: String| WeightsError::HfConfig {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// `base` with the encoder shape of this checkpoint (pooling, position embedding and drop
    /// path are fine-tuning choices and stay as in `base`).
    pub fn vit_config(&self, base: &VitConfig) -> VitConfig {
        VitConfig {
            patch_size: self.patch_size,
            dim: self.hidden_size,
            depth: self.num_hidden_layers,
            heads: self.num_attention_heads,
            mlp_ratio: self
                .mlp_ratio
                .unwrap_or(self.intermediate_size as f64 / self.hidden_size as f64),
            qkv_bias: self.qkv_bias,
            ln_eps: self.layer_norm_eps,
            ..base.clone()
        }
    }

    /// Every field where `vit` differs from this checkpoint, as "model.vit.KEY = ours, checkpoint
    /// has VALUE". Input channels and image size are adapted, so they are not compared.
    pub fn mismatches(&self, vit: &VitConfig) -> Vec<String> {
        let want = self.vit_config(vit);
        let mut out = Vec::new();
        let mut cmp = |key: &str, ours: String, theirs: String| {
            if ours != theirs {
                out.push(format!("model.vit.{key} = {ours}, checkpoint has {theirs}"));
            }
        };
        cmp("patch_size", vit.patch_size.to_string(), want.patch_size.to_string());
        cmp("dim", vit.dim.to_string(), want.dim.to_string());
        cmp("depth", vit.depth.to_string(), want.depth.to_string());
        cmp("heads", vit.heads.to_string(), want.heads.to_string());
        cmp("qkv_bias", vit.qkv_bias.to_string(), want.qkv_bias.to_string());
        // Floats: compare to relative precision. (The MLP width the ratio gives is the model's
        // business, `vit::block`; the shape check after loading catches any disagreement.)
        if (vit.mlp_ratio - want.mlp_ratio).abs() > 1e-9 * want.mlp_ratio {
            out.push(format!(
                "model.vit.mlp_ratio = {}, checkpoint has {} (intermediate_size {} / hidden_size {})",
                vit.mlp_ratio, want.mlp_ratio, self.intermediate_size, self.hidden_size
            ));
        }
        if (vit.ln_eps - self.layer_norm_eps).abs() > 1e-3 * self.layer_norm_eps.abs() {
            out.push(format!(
                "model.vit.ln_eps = {:e}, checkpoint has {:e}",
                vit.ln_eps, self.layer_norm_eps
            ));
        }
        let dinov2 = self.model_type.starts_with("dinov2");
        if self.model_type == "deit" && !vit.distilled {
            out.push(
                "model.vit.distilled = false, checkpoint is a DeiT with a distillation token (set distilled = true)"
                    .into(),
            );
        }
        if dinov2 && vit.init_values <= 0.0 {
            out.push(
                "model.vit.init_values = 0, checkpoint is a DINOv2 with layer scale (set init_values > 0, e.g. 1e-5)"
                    .into(),
            );
        }
        if dinov2 && vit.reg_tokens != self.num_register_tokens {
            out.push(format!(
                "model.vit.reg_tokens = {}, checkpoint has {} register tokens",
                vit.reg_tokens, self.num_register_tokens
            ));
        }
        if self.use_swiglu_ffn {
            out.push("use_swiglu_ffn: checkpoint has a SwiGLU MLP, which liederiv's ViT does not build".into());
        }
        if !self.hidden_act.starts_with("gelu") {
            out.push(format!(
                "hidden_act: ViT uses GELU, checkpoint has {:?}",
                self.hidden_act
            ));
        }
        out
    }
}

/// The name and shape of every parameter of our ViT, read off a dry construction of
/// [`Vit::new`] on a fresh `VarMap` (so the checked layout is the model's own, by construction).
/// A fixed sin-cos `pos_embed` is no parameter; the last norm is `norm` (cls pooling) or
/// `fc_norm` (mean pooling).
pub fn expected_shapes(
    vit: &VitConfig,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
) -> Result<BTreeMap<String, Vec<usize>>, WeightsError> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    Vit::new(vit, image_size, in_chans, num_classes, vb)?;
    let data = vm
        .data()
        .lock()
        .map_err(|_| WeightsError::Candle(candle_core::Error::Msg("VarMap lock poisoned".into())))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect())
}

/// The square token grid side of a position embedding `(1, 1 + g², D)`, if it is square.
fn square_grid(dims: &[usize]) -> Option<usize> {
    let n = dims.get(1)?.checked_sub(1)?;
    let g = (n as f64).sqrt().round() as usize;
    (g * g == n).then_some(g)
}

/// Make checkpoint tensors (in our names) fit the model whose parameter shapes are `expected`:
/// - position embedding on another square token grid: bicubic interpolation
///   ([`interpolate_pos_embed`]);
/// - patch embedding with 3 input channels into a 1-channel model: sum the weight over channels
///   (a grey image replicated to RGB gives the same patch embedding); 1 → 3: replicate / 3;
/// - head whose shape differs: dropped, the model makes a fresh one;
/// - keys the classifier does not use (MAE decoder, `norm` under mean pooling, a fixed sin-cos
///   `pos_embed`): dropped.
///
/// Each change adds a note. What still does not fit is left for [`check`] to report.
pub fn adapt(mut pre: Pretrained, expected: &BTreeMap<String, Vec<usize>>) -> Result<Pretrained, WeightsError> {
    let fam = family(expected);
    let input = fam.input;
    if let (Some(w), Some(want)) = (pre.tensors.get(input), expected.get(input)) {
        let (have_c, want_c) = (w.dim(1)?, want[1]);
        let adapted = match (have_c, want_c) {
            // (D, 3, p, p) -> (D, 1, p, p)
            (3, 1) => Some(w.sum_keepdim(1)?),
            // (D, 1, p, p) -> (D, 3, p, p), each channel a third so grey RGB input is unchanged
            (1, 3) => Some((w.repeat((1, 3, 1, 1))? / 3.0)?),
            _ => None,
        };
        if let Some(a) = adapted {
            pre.notes
                .push(format!("{input}: adapted from {have_c} to {want_c} input channels"));
            pre.tensors.insert(input.into(), a);
        }
    }
    // A class slot in the checkpoint's table that the model's (no_embed_class) lacks: folded into
    // the class token, as timm converts DINOv2 (its registers get no position either).
    if let (Some(pos), Some(cls), Some(want)) = (
        pre.tensors.get("pos_embed"),
        pre.tensors.get("cls_token"),
        expected.get("pos_embed"),
    ) {
        if want.len() == 3 && pos.dims()[1] == want[1] + 1 && square_grid(pos.dims()).is_some() {
            let folded = (cls + pos.narrow(1, 0, 1)?)?;
            let rest = pos.narrow(1, 1, want[1])?;
            pre.tensors.insert("cls_token".into(), folded);
            pre.tensors.insert("pos_embed".into(), rest);
            pre.notes.push(
                "pos_embed: its class slot added to cls_token (the model embeds the patches only: no_embed_class)"
                    .into(),
            );
        }
    }
    // (1, 1 + g_old², D) -> (1, 1 + g_new², D): bicubic, the cls slot kept (MAE's fine-tuning).
    if let (Some(pos), Some(want)) = (pre.tensors.get("pos_embed"), expected.get("pos_embed")) {
        if let (Some(old), Some(new)) = (square_grid(pos.dims()), square_grid(want)) {
            if old != new && pos.dims()[2] == want[2] {
                let resampled = interpolate_pos_embed(pos, (old, old), (new, new))?;
                pre.notes.push(format!(
                    "pos_embed: interpolated from a {old}x{old} to a {new}x{new} token grid"
                ));
                pre.tensors.insert("pos_embed".into(), resampled);
            }
        }
    }
    // PyTorch's batch counters: no meaning for the model (momentum is fixed).
    let counters: Vec<String> = pre
        .tensors
        .keys()
        .filter(|k| k.ends_with("num_batches_tracked"))
        .cloned()
        .collect();
    if !counters.is_empty() {
        counters.iter().for_each(|k| {
            pre.tensors.remove(k);
        });
        pre.notes.push(format!(
            "dropped {} num_batches_tracked counters (PyTorch's batch-norm step counts; not used)",
            counters.len()
        ));
    }
    // 1×1 conv weights (out, in, 1, 1) of a linear layer (timm's ConvNeXt with conv_mlp).
    let mut squeezed = 0;
    for (key, want) in expected {
        if let Some(t) = pre.tensors.get(key) {
            let d = t.dims();
            if want.len() == 2 && d.len() == 4 && d[0] == want[0] && d[1] == want[1] && d[2] == 1 && d[3] == 1 {
                let t = t.reshape((want[0], want[1]))?;
                pre.tensors.insert(key.clone(), t);
                squeezed += 1;
            }
        }
    }
    if squeezed > 0 {
        pre.notes
            .push(format!("read {squeezed} 1×1 conv weights as linear layers (conv_mlp)"));
    }
    // A classifier whose shape differs is dropped for a fresh one (each head on its own).
    let fits = |head: &str| {
        let w = format!("{head}weight");
        pre.tensors
            .get(&w)
            .is_some_and(|t| expected.get(&w).is_some_and(|e| t.dims() == e))
    };
    let unfit: Vec<&str> = fam.heads.iter().copied().filter(|h| !fits(h)).collect();
    let head_of = |key: &str| fam.heads.iter().any(|h| key.starts_with(h));
    let mut keys: Vec<String> = pre.tensors.keys().cloned().collect();
    keys.sort();
    for key in keys {
        if expected.contains_key(&key) && !unfit.iter().any(|h| key.starts_with(h)) {
            continue;
        }
        let why = if head_of(&key) && !expected.contains_key(&key) {
            "the model has no such head (e.g. DeiT's head_dist in a ViT that is not distilled)"
        } else if head_of(&key) {
            "fresh head for the model's classes"
        } else if key.starts_with("decoder_") || key == "mask_token" {
            "MAE decoder, not used by the classifier"
        } else if key.starts_with("norm.") && expected.contains_key("fc_norm.weight") {
            "mean pooling uses a fresh fc_norm instead"
        } else if key == "pos_embed" {
            "the model uses fixed sin-cos position embeddings"
        } else {
            continue; // unexpected: reported by `check`
        };
        if let Some(t) = pre.tensors.remove(&key) {
            pre.notes.push(format!("dropped {key} {:?}: {why}", t.dims()));
        }
    }
    Ok(pre)
}

/// Compare every tensor with the model's shapes. Fails listing ALL shape mismatches
/// (`name: checkpoint [..] vs model [..]`), every missing key other than the new head / fc_norm,
/// and every key the model does not have.
pub fn check(tensors: &HashMap<String, Tensor>, expected: &BTreeMap<String, Vec<usize>>) -> Result<(), WeightsError> {
    let fresh = family(expected).fresh;
    let mut mismatches = Vec::new();
    let mut missing = Vec::new();
    for (name, shape) in expected {
        match tensors.get(name) {
            Some(t) if t.dims() != shape.as_slice() => {
                mismatches.push(format!("{name}: checkpoint {:?} vs model {shape:?}", t.dims()))
            }
            Some(_) => {}
            None if fresh.contains(&name.as_str()) => {}
            None => missing.push(name.clone()),
        }
    }
    let mut unexpected: Vec<String> = tensors.keys().filter(|k| !expected.contains_key(*k)).cloned().collect();
    unexpected.sort();
    if mismatches.is_empty() && missing.is_empty() && unexpected.is_empty() {
        Ok(())
    } else {
        Err(WeightsError::Shapes {
            mismatches,
            missing,
            unexpected,
        })
    }
}

/// Rename (by layout), adapt and check a checkpoint for a ViT of the given shape
/// (`image_size` in pixels, `in_chans` input channels, `num_classes` logits).
pub fn convert(
    ckpt: HashMap<String, Tensor>,
    layout: Layout,
    vit: &VitConfig,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
) -> Result<Pretrained, WeightsError> {
    let pre = match layout {
        Layout::Hf => hf_to_timm(ckpt)?,
        Layout::Timm => Pretrained {
            tensors: ckpt,
            notes: Vec::new(),
        },
    };
    let expected = expected_shapes(vit, image_size, in_chans, num_classes)?;
    let pre = adapt(pre, &expected)?;
    check(&pre.tensors, &expected)?;
    Ok(pre)
}

/// Where `init` says the Hub repo is (`init.hub_repo` at `init.hub_revision`, cache
/// `init.hub_cache_dir` or hf-hub's default, `init.offline`).
pub fn hub_source(init: &InitConfig) -> HubSource<'_> {
    HubSource {
        repo: &init.hub_repo,
        kind: RepoKind::Model,
        revision: &init.hub_revision,
        cache_dir: (!init.hub_cache_dir.is_empty()).then(|| Path::new(&init.hub_cache_dir)),
        offline: init.offline,
        endpoint: None,
    }
}

/// The checkpoint files of a Hugging Face model repo: `model.safetensors`, else
/// `pytorch_model.bin`, and `config.json` when the layout is HF. Returns (weights, config).
pub fn fetch_hub_files(src: &HubSource, layout: Layout) -> Result<(PathBuf, Option<PathBuf>), WeightsError> {
    let weights = match hub::fetch(src, "model.safetensors") {
        Ok(p) => p,
        Err(safetensors) => hub::fetch(src, "pytorch_model.bin").map_err(|bin| WeightsError::HubWeights {
            repo: src.repo.to_string(),
            safetensors: Box::new(safetensors),
            bin: Box::new(bin),
        })?,
    };
    let config = match layout {
        Layout::Hf => Some(hub::fetch(src, "config.json")?),
        Layout::Timm => None,
    };
    Ok((weights, config))
}

/// The config-driven path: `init.weights = "hub"` (repo `init.hub_repo`) or `"file"`
/// (`init.file`, with a `config.json` beside it checked when present), `init.format = "hf" |
/// "timm"`. For HF checkpoints, `config.json` must describe the same encoder as `vit`.
/// Returns f32 CPU tensors in our names for a ViT of (`vit`, `image_size`, `in_chans`,
/// `num_classes`), plus notes on what was adapted or dropped.
pub fn load_pretrained(
    init: &InitConfig,
    vit: &VitConfig,
    image_size: usize,
    in_chans: usize,
    num_classes: usize,
) -> Result<Pretrained, WeightsError> {
    let layout = Layout::of(init.format)?;
    let (weights, config) = checkpoint_files(init, layout)?;
    if let Some(path) = config {
        let mismatches = HfVitConfig::read(&path)?.mismatches(vit);
        if !mismatches.is_empty() {
            return Err(WeightsError::ConfigMismatch { path, mismatches });
        }
    }
    let ckpt = read_checkpoint(&weights)?;
    convert(ckpt, layout, vit, image_size, in_chans, num_classes)
}

/// The weights file `init` names (`init.weights = "hub"`: fetched from `init.hub_repo`;
/// `"file"`: `init.file`) and, for the HF layout, its `config.json` when there is one.
fn checkpoint_files(init: &InitConfig, layout: Layout) -> Result<(PathBuf, Option<PathBuf>), WeightsError> {
    match init.weights {
        InitWeights::Hub => fetch_hub_files(&hub_source(init), layout),
        InitWeights::File => {
            let file = PathBuf::from(&init.file);
            let beside = file.with_file_name("config.json");
            let config = (layout == Layout::Hf && beside.is_file()).then_some(beside);
            Ok((file, config))
        }
        other => Err(WeightsError::NotPretrained {
            weights: other.name().into(),
        }),
    }
}

/// A timm ResNet / ConvNeXt state dict (`init.format = "timm"`, a file or a Hub repo such as
/// `timm/resnet18.a1_in1k`) for the model whose parameter shapes are `expected`
/// ([`crate::models::parameter_shapes`]): adapted (input channels, a fresh head for other
/// classes, batch counters dropped, conv-MLP weights read as linear) and checked.
pub fn load_timm(init: &InitConfig, expected: &BTreeMap<String, Vec<usize>>) -> Result<Pretrained, WeightsError> {
    if init.format != WeightFormat::Timm {
        return Err(WeightsError::TimmOnly {
            format: init.format.name().into(),
        });
    }
    let (weights, _) = checkpoint_files(init, Layout::Timm)?;
    let pre = Pretrained {
        tensors: read_checkpoint(&weights)?,
        notes: Vec::new(),
    };
    let pre = adapt(pre, expected)?;
    check(&pre.tensors, expected)?;
    Ok(pre)
}
