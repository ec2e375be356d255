//! The one config of a run: typed sections with defaults, a TOML file, then `--set key=value`
//! overrides, validated once by [`Config::resolve`]. Nothing downstream validates again.
//!
//! Follows nanoGPT's configurator (unknown keys and wrong types are errors) and ripgrep's
//! two-stage arguments (raw text → validated config). Every field documents its units; this
//! file is a little over 600 lines because it is the one place where every key, its default
//! and its meaning are read together (the named choices are in [`choices`], the checks in
//! `validate`).

mod choices;
mod validate;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use choices::{
    DataSource, InitWeights, Interpolation, Kernels, LeeOutput, ModelKind, Objective, Pool, PosEmbed, Precision,
    PretrainImages, ResnetBlock, Statistic, WeightFormat,
};
pub use validate::ConfigError;

use crate::transforms::{Stencil, Transform};

/// The environment variable that names the local data root (IDX folders, `.amat` files).
pub const DATA_DIR_ENV: &str = "LIEDERIV_DATA_DIR";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run name: outputs go to `<output.dir>/<name>/`.
    pub name: String,
    /// Master seed: model init, data order, augmentation, masking, dropout.
    pub seed: u64,
    /// "auto" | "cpu" | "cuda" | "cuda:N". `auto` picks CUDA when built with it and a GPU exists.
    pub device: String,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub init: InitConfig,
    pub pretrain: PretrainConfig,
    pub train: TrainConfig,
    pub augment: AugmentConfig,
    pub eval: EvalConfig,
    pub lee: LeeConfig,
    pub output: OutputConfig,
    pub runtime: RuntimeConfig,
    /// `liederiv zoo`'s models (absent from run configs).
    #[serde(skip_serializing_if = "ZooConfig::is_unset")]
    pub zoo: ZooConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "run".into(),
            seed: 0,
            device: "auto".into(),
            data: DataConfig::default(),
            model: ModelConfig::default(),
            init: InitConfig::default(),
            pretrain: PretrainConfig::default(),
            train: TrainConfig::default(),
            augment: AugmentConfig::default(),
            eval: EvalConfig::default(),
            lee: LeeConfig::default(),
            output: OutputConfig::default(),
            runtime: RuntimeConfig::default(),
            zoo: ZooConfig::default(),
        }
    }
}

impl VitConfig {
    /// Tokens before the patch tokens: the class token, the distillation token, the registers.
    pub fn prefix_tokens(&self) -> usize {
        usize::from(self.class_token) + usize::from(self.distilled) + self.reg_tokens
    }
}

impl ConvnextConfig {
    /// The stride of stage `s` (timm's rule): 2 for every stage but the first, and for the first
    /// too when the stem's stride is 2 (a 2-pixel patch stem reaches stride 4 in stage 0).
    pub fn stage_stride(&self, s: usize) -> usize {
        if s > 0 || self.patch_size == 2 {
            2
        } else {
            1
        }
    }
}

/// `liederiv zoo`: several models measured on the same images, each built from this config with
/// its own overrides (its architecture, weights and preprocessing). The measurements use `[lee]`
/// (transforms, stencil, statistic, output, batch size).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ZooConfig {
    /// The split every model is measured on ("train", "val", "test" or an OOD set's name).
    pub split: String,
    /// The first N images of the split (0 = all).
    pub limit: usize,
    /// Transforms whose layerwise decomposition is written per model ([] = none).
    pub layerwise: Vec<Transform>,
    /// Output folder ("" = `<output.dir>/<name>`).
    pub out: String,
    pub models: Vec<ZooModel>,
}

impl Default for ZooConfig {
    fn default() -> Self {
        Self {
            split: "test".into(),
            limit: 256,
            layerwise: Vec::new(),
            out: String::new(),
            models: Vec::new(),
        }
    }
}

impl ZooConfig {
    /// Whether the section is absent (not written into run configs).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// One model of a zoo.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ZooModel {
    /// Its name in the tables and file names (no slashes).
    pub name: String,
    /// Its family (the colour in the error-vs-LEE figure), e.g. "resnet", "convnext", "vit".
    pub family: String,
    /// `--set` overrides of the zoo config that build this model: `model.*`, `init.*` (a timm
    /// file or Hub repo), its preprocessing (`data.mean`, `data.std`, `data.image_size`,
    /// `data.interpolation`, `data.crop_pct`).
    pub set: Vec<String>,
    /// A checkpoint of ours to measure instead of the initial weights ("" = none).
    pub checkpoint: String,
}

/// Where the digits come from and how MNIST-rot is regenerated (DESIGN.md, "MNIST-rot").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Local data root holding `mnist/` (IDX files). Empty: `$LIEDERIV_DATA_DIR`, else the Hub.
    pub root: String,
    /// "auto" (IDX under the root if one is set, else the Hub) | "idx" | "hub" | "amat".
    pub source: DataSource,
    /// Folder of MNIST IDX files, relative to `root` (or absolute).
    pub mnist_dir: String,
    /// Hugging Face dataset repo used when `source` resolves to "hub".
    pub hub_repo: String,
    /// Hub cache folder of the data sets; empty = hf-hub's default ($HF_HUB_CACHE, else
    /// $HF_HOME/hub, else ~/.cache/huggingface/hub).
    pub hub_cache_dir: String,
    /// Never touch the network for data: Hub data sets come from the cache only.
    pub offline: bool,
    /// Folder with the original `mnist_all_rotation_normalized_float_{train_valid,test}.amat`.
    pub amat_dir: String,
    /// Where regenerated MNIST-rot sets are cached (relative to the working directory).
    pub cache_dir: String,
    /// Seed of the pool permutation and the rotation angles (independent of the run seed).
    pub split_seed: u64,
    /// Images in the train / val / test splits of the 70k pool (paper: 10000 / 2000 / 50000).
    pub train_size: usize,
    pub val_size: usize,
    pub test_size: usize,
    /// Train on train+val (the literature's protocol for final models); eval "val" still exists.
    pub train_on_val: bool,
    /// Use only the first N training images (0 = all); for quick runs.
    pub train_limit: usize,
    /// Out-of-distribution eval sets, each an IDX folder (relative to `root` or absolute).
    pub ood: Vec<OodConfig>,
    /// Per-channel normalisation applied by the loader: (x - mean) / std, x in [0, 1]. One
    /// number for every channel, or one per channel (ImageNet's: [0.485, 0.456, 0.406] /
    /// [0.229, 0.224, 0.225]).
    pub mean: PerChannel,
    pub std: PerChannel,
    /// Side of the images fed to the model in pixels (28 = native; 224 resizes bicubically).
    pub image_size: usize,
    /// Input channels fed to the model (1, or 3 to replicate grey for RGB checkpoints; photos
    /// are converted to it as PIL's `convert("L" | "RGB")`).
    pub channels: usize,
    /// `data.source = "folder"`: the folder holding `train/`, `test/` and optionally `val/`,
    /// each with one subfolder of PNG / JPEG files per class (absolute, or relative to the
    /// working directory).
    pub folder: String,
    /// Photos: the resampling filter of their resizes.
    pub interpolation: Interpolation,
    /// Photos, evaluation: resize the shorter side to ⌊image_size / crop_pct⌋, then centre-crop
    /// image_size (timm's `crop_pct`; 1 = no margin).
    pub crop_pct: f64,
    /// `data.source = "parquet"`: the Hub data set (cached in `hub_cache_dir`, `offline` as MNIST).
    pub parquet: ParquetConfig,
}

/// A Hub image-classification data set in the `datasets` Parquet layout (the dataset viewer's
/// conversion, revision `refs/convert/parquet`: files `<config>/<split>/NNNN.parquet`, each row
/// an Image feature `{bytes, path}` and an integer label).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetConfig {
    /// `owner/name` of the dataset repo.
    pub repo: String,
    /// The dataset config (subset) name: the first folder of its Parquet files.
    pub config: String,
    /// The repo's split names read as train, val ("" = none) and test.
    pub train: String,
    pub val: String,
    pub test: String,
    /// The Image-feature column and the integer label column.
    pub image_column: String,
    pub label_column: String,
}

impl Default for ParquetConfig {
    fn default() -> Self {
        Self {
            repo: String::new(),
            config: "default".into(),
            train: "train".into(),
            val: String::new(),
            test: "test".into(),
            image_column: "image".into(),
            label_column: "label".into(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            root: String::new(),
            source: DataSource::Auto,
            mnist_dir: "mnist".into(),
            hub_repo: "ylecun/mnist".into(),
            hub_cache_dir: String::new(),
            offline: false,
            amat_dir: String::new(),
            cache_dir: ".cache/liederiv".into(),
            split_seed: 0,
            train_size: 10_000,
            val_size: 2_000,
            test_size: 50_000,
            train_on_val: true,
            train_limit: 0,
            ood: vec![OodConfig::default()],
            mean: PerChannel(vec![0.1307]),
            std: PerChannel(vec![0.3081]),
            image_size: 28,
            channels: 1,
            folder: String::new(),
            interpolation: Interpolation::Bicubic,
            crop_pct: 0.875,
            parquet: ParquetConfig::default(),
        }
    }
}

impl DataConfig {
    /// A blank (black) pixel in normalised units, −mean / std per channel: what warps of
    /// normalised images fill their outside with.
    pub fn blank(&self) -> crate::transforms::Blank {
        match (self.mean.0.as_slice(), self.std.0.as_slice()) {
            ([m], [s]) => crate::transforms::Blank::uniform(-m / s),
            _ => crate::transforms::Blank::per_channel(
                (0..self.channels)
                    .map(|c| -self.mean.get(c) / self.std.get(c))
                    .collect(),
            ),
        }
    }
}

/// A per-channel setting: one number for every channel, or a list with one per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct PerChannel(pub Vec<f64>);

impl PerChannel {
    /// The value of channel `c` (the single value for every channel).
    pub fn get(&self, c: usize) -> f64 {
        match self.0.as_slice() {
            [v] => *v,
            vs => vs[c],
        }
    }
}

impl Serialize for PerChannel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [v] => s.serialize_f64(*v),
            vs => vs.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PerChannel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(f64),
            Many(Vec<f64>),
        }
        match Raw::deserialize(d) {
            Ok(Raw::One(v)) => Ok(PerChannel(vec![v])),
            Ok(Raw::Many(vs)) => Ok(PerChannel(vs)),
            Err(_) => Err(serde::de::Error::custom(
                "expected a number or a list of numbers (one per channel)",
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OodConfig {
    /// Split name becomes `ood_<name>`.
    pub name: String,
    /// IDX folder holding `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`.
    pub path: String,
    /// Hugging Face dataset repo whose test split is read (its Parquet conversion) when no local
    /// folder holds the set: "auto" (= "zalando-datasets/fashion_mnist" when `path` is
    /// "fashion-mnist", else none), "" (none: the local folder only) or a repo id.
    pub hub_repo: String,
    /// Rotate each image by a seeded uniform angle, as MNIST-rot does.
    pub rotate: bool,
    /// Use the first N images (0 = all).
    pub limit: usize,
}

impl Default for OodConfig {
    fn default() -> Self {
        Self {
            name: "fashion".into(),
            path: "fashion-mnist".into(),
            hub_repo: "auto".into(),
            rotate: true,
            limit: 0,
        }
    }
}

impl OodConfig {
    /// The Hub repo this set falls back to when no local folder holds it ("auto" resolved).
    pub fn hub_repo(&self) -> Option<&str> {
        match self.hub_repo.as_str() {
            "" => None,
            "auto" if self.path == "fashion-mnist" => Some("zalando-datasets/fashion_mnist"),
            "auto" => None,
            repo => Some(repo),
        }
    }
}

/// Which network, and its shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// "vit" | "cnn" | "gcnn" | "resnet" | "convnext".
    pub kind: ModelKind,
    pub num_classes: usize,
    /// Average the logits over the N rotations of C_N (invariance by averaging; 0 = off). Its
    /// JVP averages the model's at the rotated inputs, so LEE measures it like any model.
    pub average_rotations: usize,
    pub vit: VitConfig,
    pub mae: MaeConfig,
    pub cnn: CnnConfig,
    pub gcnn: GcnnConfig,
    pub resnet: ResnetConfig,
    pub convnext: ConvnextConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Vit,
            num_classes: 10,
            average_rotations: 0,
            vit: VitConfig::default(),
            mae: MaeConfig::default(),
            cnn: CnnConfig::default(),
            gcnn: GcnnConfig::default(),
            resnet: ResnetConfig::default(),
            convnext: ConvnextConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VitConfig {
    /// Patch side in pixels; must divide `data.image_size`.
    pub patch_size: usize,
    /// Token width.
    pub dim: usize,
    pub depth: usize,
    /// Attention heads; must divide `dim`.
    pub heads: usize,
    /// MLP hidden width = mlp_ratio × dim.
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    /// "cls" | "mean" (mean pooling of patch tokens followed by fc_norm).
    pub pool: Pool,
    /// "learned" | "sincos".
    pub pos_embed: PosEmbed,
    /// Stochastic depth rate at the last block (linear in depth), in [0, 1).
    pub drop_path: f64,
    pub ln_eps: f64,
    /// A class token (timm's `class_token`); without one the head reads the mean of the patch
    /// tokens (`pool = "mean"`).
    pub class_token: bool,
    /// Register tokens after the class token (Darcet et al. 2024; timm's `reg_tokens`).
    pub reg_tokens: usize,
    /// The position embedding covers the patch tokens only and is added before the class /
    /// register tokens join (timm's `no_embed_class`).
    pub no_embed_class: bool,
    /// A LayerNorm `norm_pre` before the blocks, and no patch-embedding bias (CLIP; timm's
    /// `pre_norm`).
    pub pre_norm: bool,
    /// Layer scale: each residual branch times a learned per-channel `ls1` / `ls2` gamma that
    /// starts at this value (CaiT / DINOv2; timm's `init_values`; 0 = off).
    pub init_values: f64,
    /// DeiT's distillation token and its head `head_dist` (timm's `VisionTransformerDistilled`):
    /// the logits are the mean of the two heads' (timm's eval-mode output).
    pub distilled: bool,
}

impl Default for VitConfig {
    fn default() -> Self {
        Self {
            patch_size: 7,
            dim: 64,
            depth: 4,
            heads: 2,
            mlp_ratio: 4.0,
            qkv_bias: true,
            pool: Pool::Cls,
            pos_embed: PosEmbed::Learned,
            drop_path: 0.0,
            ln_eps: 1e-6,
            class_token: true,
            reg_tokens: 0,
            no_embed_class: false,
            pre_norm: false,
            init_values: 0.0,
            distilled: false,
        }
    }
}

/// The MAE decoder and masking (He et al. 2022), used by the `mae` objective.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaeConfig {
    pub decoder_dim: usize,
    pub decoder_depth: usize,
    pub decoder_heads: usize,
    /// Fraction of patches hidden from the encoder, in (0, 1).
    pub mask_ratio: f64,
    /// Normalise each target patch by its own mean and variance (MAE's norm_pix_loss).
    pub norm_pix_loss: bool,
}

impl Default for MaeConfig {
    fn default() -> Self {
        Self {
            decoder_dim: 64,
            decoder_depth: 2,
            decoder_heads: 2,
            mask_ratio: 0.75,
            norm_pix_loss: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CnnConfig {
    /// Channels of each ResNet stage; every stage halves the resolution (28 → 14 → 7 → 4 → 2).
    pub widths: Vec<usize>,
    /// Residual blocks per stage.
    pub blocks: usize,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            widths: vec![16, 32, 64, 128],
            blocks: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GcnnConfig {
    /// Order N of the rotation group C_N: 4 (exact), 8 or 16 (interpolated filters).
    pub group_order: usize,
    /// Fields (each N channels) per layer.
    pub widths: Vec<usize>,
    /// Filter side in pixels (odd).
    pub kernel_size: usize,
}

impl Default for GcnnConfig {
    fn default() -> Self {
        Self {
            group_order: 8,
            widths: vec![8, 16, 16, 16],
            kernel_size: 5,
        }
    }
}

/// timm's `ResNet` (He et al. 2016; v1.5: the stride in the 3×3 conv), keys named as timm's
/// arguments. Stem 7×7 stride-2 conv of width 64 (timm's plain stem: its `stem_width` sizes only
/// the deep stems), 3×3 stride-2 max pool, then one stage per
/// entry of `layers`; every stage but the first halves the grid. The default is ResNet-18.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResnetConfig {
    /// "basic" | "bottleneck" (output width 4 × the stage's channels).
    pub block: ResnetBlock,
    /// Blocks per stage (ResNet-18: [2, 2, 2, 2]; ResNet-50: [3, 4, 6, 3]).
    pub layers: Vec<usize>,
    /// Width of each stage (timm's `channels`), as many as `layers`.
    pub channels: Vec<usize>,
    /// Stochastic depth rate at the last block (linear in the block index, as timm), in [0, 1).
    pub drop_path_rate: f64,
}

impl Default for ResnetConfig {
    fn default() -> Self {
        Self {
            block: ResnetBlock::Basic,
            layers: vec![2, 2, 2, 2],
            channels: vec![64, 128, 256, 512],
            drop_path_rate: 0.0,
        }
    }
}

/// timm's `ConvNeXt` (Liu et al. 2022), keys named as timm's arguments: a `patch_size` stride
/// patchify stem + LayerNorm, stages of blocks (k×k depthwise conv, channels-last LayerNorm,
/// GELU MLP of 4× width, layer scale, residual), LayerNorm + 2×2 stride-2 conv between stages,
/// global average pool, LayerNorm, linear head. The default is ConvNeXt-Atto.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConvnextConfig {
    /// Blocks per stage (Atto: [2, 2, 6, 2]; Tiny: [3, 3, 9, 3]).
    pub depths: Vec<usize>,
    /// Width of each stage, as many as `depths` (Atto: [40, 80, 160, 320]; Tiny: [96, 192, 384, 768]).
    pub dims: Vec<usize>,
    /// Stem patch side (and stride) in pixels.
    pub patch_size: usize,
    /// Side of the depthwise filters (odd).
    pub kernel_sizes: usize,
    /// The MLP as 1×1 convs (timm's `conv_mlp`; Atto-Nano use it): the same maths, the weights
    /// stored `(out, in, 1, 1)` in timm's files.
    pub conv_mlp: bool,
    /// Initial layer-scale value (`gamma`); 0 = no layer scale.
    pub ls_init_value: f64,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
    /// Stochastic depth rate at the last block (linear in the block index), in [0, 1).
    pub drop_path_rate: f64,
}

impl Default for ConvnextConfig {
    fn default() -> Self {
        Self {
            depths: vec![2, 2, 6, 2],
            dims: vec![40, 80, 160, 320],
            patch_size: 4,
            kernel_sizes: 7,
            conv_mlp: true,
            ls_init_value: 1e-6,
            norm_eps: 1e-6,
            drop_path_rate: 0.0,
        }
    }
}

/// Where the starting weights come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InitConfig {
    /// "random" | "hub" (repo id below) | "file" (safetensors / pytorch_model.bin) | "pretrain"
    /// (the encoder of this config's own `[pretrain]` stage).
    pub weights: InitWeights,
    /// Hugging Face model repo, e.g. "facebook/vit-mae-base".
    pub hub_repo: String,
    pub hub_revision: String,
    /// Hub cache folder; empty = hf-hub's default ($HF_HOME/hub).
    pub hub_cache_dir: String,
    /// Never touch the network: use only files already in the cache.
    pub offline: bool,
    /// Local checkpoint path for `weights = "file"`.
    pub file: String,
    /// Key layout of the checkpoint: "hf" | "timm" | "liederiv".
    pub format: WeightFormat,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            weights: InitWeights::Random,
            hub_repo: String::new(),
            hub_revision: "main".into(),
            hub_cache_dir: String::new(),
            offline: false,
            file: String::new(),
            format: WeightFormat::Hf,
        }
    }
}

/// Optional self-supervised MAE stage run before fine-tuning (reused when already finished).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub enabled: bool,
    /// The digits it sees (`data.train_limit` applies to them too).
    pub images: PretrainImages,
    /// Optimiser steps of pretraining.
    pub steps: usize,
    pub batch_size: usize,
    /// Base learning rate; the actual lr is base_lr × batch_size / 256.
    pub base_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            images: PretrainImages::FineTune,
            steps: 2000,
            batch_size: 128,
            base_lr: 1.5e-4,
            min_lr: 0.0,
            warmup_steps: 200,
            weight_decay: 0.05,
        }
    }
}

/// Supervised fine-tuning (the `classify` objective).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// "classify" | "mae".
    pub objective: Objective,
    /// Optimiser steps (each = accum_steps micro-batches).
    pub steps: usize,
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step.
    pub accum_steps: usize,
    /// Base learning rate; the actual lr is base_lr × batch_size × accum_steps / 256.
    pub base_lr: f64,
    /// Floor of the cosine schedule.
    pub min_lr: f64,
    /// Linear warm-up length in steps.
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Layer-wise lr decay (MAE fine-tuning): block i gets lr × layer_decay^(depth+1−i). 1 = off.
    pub layer_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// λ of the λ·LEE penalty added to the loss (0 = off).
    pub lee_penalty: f64,
    /// Transforms whose LEE the penalty sums.
    pub lee_penalty_transforms: Vec<Transform>,
    /// The output the penalty's Lie derivative is taken of (as `lee.output`); for `features` /
    /// `tokens` the penalty is the scale-free form, so shrinking the features cannot lower it.
    pub lee_penalty_output: LeeOutput,
    /// Images of each micro-batch the penalty is measured on: its first N (the batch order is
    /// already shuffled), 0 = all. The penalty's JVP and its backward cost several train steps per
    /// image, and the batch mean of LEE is estimated well from a subset.
    pub lee_penalty_images: usize,
    /// Gradient checkpointing (timm's `set_grad_checkpointing`): each transformer block of the ViT
    /// (and of the MAE encoder and decoder when pretraining) keeps only its input and is recomputed
    /// in the backward. The same gradients for about a third more compute and a fraction of the
    /// activation memory. The LEE penalty's JVP graph is not checkpointed.
    pub grad_checkpointing: bool,
    /// "f32" | "bf16": the training step's compute dtype (both stages). bf16 is mixed precision:
    /// f32 master weights and AdamW state (checkpoints stay f32), bf16 activations and matmuls, the
    /// loss and its reductions in f32; evaluation, LEE and the LEE penalty stay f32.
    pub precision: Precision,
    /// Evaluate every N steps (and at the end).
    pub eval_every: usize,
    /// Write a checkpoint every N steps (and at the end).
    pub checkpoint_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            objective: Objective::Classify,
            steps: 1000,
            batch_size: 128,
            accum_steps: 1,
            base_lr: 1e-3,
            min_lr: 1e-6,
            warmup_steps: 100,
            weight_decay: 0.05,
            layer_decay: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            label_smoothing: 0.0,
            grad_clip: 0.0,
            lee_penalty: 0.0,
            lee_penalty_transforms: vec![Transform::Rotate],
            lee_penalty_output: LeeOutput::Probs,
            lee_penalty_images: 0,
            grad_checkpointing: false,
            precision: Precision::F32,
            eval_every: 200,
            checkpoint_every: 200,
        }
    }
}

/// On-the-fly augmentation of training batches (all off by default).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random rotation of each image by an angle uniform in [-rotate_deg, rotate_deg] (degrees;
    /// 180 = full circle, 0 = off).
    pub rotate_deg: f64,
    /// Random translation, uniform in [-t, t] of the normalised [-1, 1] coordinates (0 = off).
    pub translate: f64,
    /// Random isotropic scale factor in [1 - s, 1 + s] (0 = off).
    pub scale: f64,
    /// Mixup Beta(α, α) parameter (0 = off).
    pub mixup_alpha: f64,
    /// CutMix Beta(α, α) parameter (0 = off). With both on, each batch picks one at random.
    pub cutmix_alpha: f64,
    /// Probability of random erasing per image (0 = off).
    pub erase_prob: f64,
    /// Photos: torchvision's `RandomResizedCrop` to data.image_size (box area fraction in
    /// `crop_scale`, aspect ratio log-uniform in `crop_ratio`) in place of evaluation's resize
    /// and centre crop.
    pub random_resized_crop: bool,
    pub crop_scale: [f64; 2],
    pub crop_ratio: [f64; 2],
    /// Photos: probability of a horizontal flip per image (0 = off).
    pub hflip: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            rotate_deg: 0.0,
            translate: 0.0,
            scale: 0.0,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            erase_prob: 0.0,
            random_resized_crop: false,
            crop_scale: [0.08, 1.0],
            crop_ratio: [0.75, 4.0 / 3.0],
            hflip: 0.0,
        }
    }
}

/// Periodic and final evaluation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Splits whose loss and accuracy are measured: "train", "val", "test", "ood_<name>".
    pub splits: Vec<String>,
    /// Images per split for periodic accuracy (0 = all). The final eval always uses all.
    pub limit: usize,
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            splits: vec!["val".into(), "test".into()],
            limit: 2000,
            batch_size: 256,
        }
    }
}

/// The local equivariance error (paper Eq. 4) and how it is measured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LeeConfig {
    /// Transforms measured: translate_x, translate_y, rotate, shear_x, shear_y, stretch_x,
    /// stretch_y, scale, hyperbolic, saturate.
    pub transforms: Vec<Transform>,
    /// Splits measured, each on the same fixed first `limit` images every time.
    pub splits: Vec<String>,
    /// Images per split (0 = all).
    pub limit: usize,
    /// Pixel derivative: "central" | "forward" | "spectral".
    pub stencil: Stencil,
    /// "sq": (1/K)Σ(L_X p_k)² (paper Eq. 4) | "abs": (1/K)Σ|L_X p_k| (the reference code's CSVs).
    pub statistic: Statistic,
    /// The output differentiated: "probs" (the paper's) | "logits" | "features" | "tokens".
    pub output: LeeOutput,
    /// Read only: run folders written before `output` existed say `use_logits = true` for
    /// `output = "logits"` ([`Config::resolve_str`] translates it; it is never written).
    #[serde(skip_serializing)]
    pub use_logits: bool,
    pub batch_size: usize,
    /// Layerwise decomposition: Rademacher probes of the Hutchinson estimate of each step's
    /// ‖contribution‖² (0 = exact norms, fine for K up to a few thousand classes).
    pub layerwise_probes: usize,
    /// Random transforms drawn per image by the EQ-T, EQ-T_frac, EQ-R and sampled metrics.
    pub metric_draws: usize,
}

impl Default for LeeConfig {
    fn default() -> Self {
        Self {
            transforms: vec![Transform::Rotate, Transform::TranslateX, Transform::TranslateY],
            splits: vec!["train".into(), "test".into(), "ood_fashion".into()],
            limit: 256,
            stencil: Stencil::Central,
            statistic: Statistic::Sq,
            output: LeeOutput::Probs,
            use_logits: false,
            batch_size: 64,
            layerwise_probes: 0,
            metric_draws: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Root of run directories.
    pub dir: String,
    /// Write PNG and SVG plots at the end of a run.
    pub plots: bool,
    /// Show progress: a bar at a terminal; one-line records (stage, step, loss, images/s, ETA)
    /// every tenth of a stage and every 30 s when stderr is not a terminal (`crate::progress`).
    pub progress: bool,
    /// Write TensorBoard event files in the run folder (`tensorboard --logdir <output.dir>`).
    pub tensorboard: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: "runs".into(),
            plots: true,
            progress: true,
            tensorboard: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// "fused" (default: the fused CPU kernels where they apply) | "portable" (the composed ops
    /// every other device runs, on the CPU too; `kernels::set_portable`).
    pub kernels: Kernels,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            kernels: Kernels::Fused,
        }
    }
}

impl Config {
    /// Read `path`, apply `overrides` (`dotted.key=value`), deserialize strictly and validate.
    pub fn resolve(path: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.to_path_buf(),
                    source: e,
                })?;
                (text, p.display().to_string())
            }
            None => (String::new(), "<defaults>".to_string()),
        };
        Self::resolve_str(&text, &origin, overrides)
    }

    /// As [`Config::resolve`], from in-memory TOML (tests feed strings).
    pub fn resolve_str(text: &str, origin: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        // Parse the file alone first so that its errors carry the file's line numbers.
        let file_cfg: Config = validate::deserialize_str(text, origin)?;
        let cfg = if overrides.is_empty() {
            file_cfg
        } else {
            let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: origin.into(),
                message: e.to_string(),
            })?;
            for o in overrides {
                validate::apply_override(&mut table, o)?;
            }
            validate::deserialize_table(table, "--set")?
        };
        let mut cfg = cfg;
        if std::mem::take(&mut cfg.lee.use_logits) {
            if cfg.lee.output != LeeOutput::Probs {
                return Err(ConfigError::OutOfRange {
                    key: "lee.use_logits".into(),
                    value: "true".into(),
                    allowed: format!(
                        "false: it is the old spelling of lee.output = \"logits\" and contradicts lee.output = \"{}\"",
                        cfg.lee.output
                    ),
                });
            }
            cfg.lee.output = LeeOutput::Logits;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The local data root: `data.root`, else `$LIEDERIV_DATA_DIR`, else none (use the Hub).
    pub fn data_root(&self) -> Option<PathBuf> {
        if !self.data.root.is_empty() {
            return Some(PathBuf::from(&self.data.root));
        }
        std::env::var_os(DATA_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }

    /// Actual peak learning rate of fine-tuning: base_lr × effective batch / 256 (MAE's rule).
    pub fn lr(&self) -> f64 {
        self.train.base_lr * (self.train.batch_size * self.train.accum_steps) as f64 / 256.0
    }

    /// Actual peak learning rate of MAE pretraining.
    pub fn pretrain_lr(&self) -> f64 {
        self.pretrain.base_lr * self.pretrain.batch_size as f64 / 256.0
    }

    /// The run directory `<output.dir>/<name>`.
    pub fn run_dir(&self) -> PathBuf {
        Path::new(&self.output.dir).join(&self.name)
    }

    /// The resolved config as TOML (saved in every run directory and checkpoint).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not serialise config: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
