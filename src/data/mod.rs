//! MNIST and its rotated benchmark: IDX / `.amat` / Hub sources, the regenerated MNIST-rot
//! splits (DESIGN.md, "MNIST-rot"), out-of-distribution sets, and the batch loader.
//!
//! Owns: reading and validating the sources ([`idx`], [`amat`], [`hub_mnist`]), building and
//! caching the splits ([`rot`]), and turning a split into normalized tensors ([`batch`]). Does
//! not own the warp itself (`crate::transforms::apply`, shared with the LEE code) nor on-the-fly
//! augmentation (`train`).

pub mod amat;
pub mod hub_mnist;
pub mod idx;
mod loader;
pub mod preprocess;
mod rot;

pub use loader::{batch, epoch_order};
pub use rot::{cache_path, mnist_pool, mnist_rot_draw, rotate_images};

use crate::config::{Config, PretrainImages};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Digit classes of MNIST and Fashion-MNIST.
pub const NUM_CLASSES: usize = 10;

/// One named set of images: `images` holds n·h·w floats in [0, 1] (row-major), `labels` n classes.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub name: String,
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
    pub h: usize,
    pub w: usize,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// SHA-256 (hex) over the image floats as little-endian bytes, then the label bytes: the
    /// fingerprint `data info` prints, so determinism can be checked from outside.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        for chunk in self.images.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            h.update(&bytes);
        }
        h.update(&self.labels);
        hex::encode(h.finalize())
    }

    /// Images per class 0..=9.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; NUM_CLASSES];
        for &l in &self.labels {
            if let Some(slot) = c.get_mut(l as usize) {
                *slot += 1;
            }
        }
        c
    }
}

/// Raw 8-bit digits as the IDX and Hub sources hold them: `images` n·h·w in 0..=255.
#[derive(Clone, Debug, PartialEq)]
pub struct Digits {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub h: usize,
    pub w: usize,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}: bad magic number {found} (expected {expected}: 2051 for an IDX images file, \
         2049 for a labels file); is this the right file?"
    )]
    BadMagic { path: PathBuf, expected: u32, found: u32 },
    #[error(
        "{path} is truncated: the header announces {expected} bytes, the file holds {actual} \
         (after gunzip); download it again"
    )]
    Truncated { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path} is corrupt: {message}.{hint}", hint = crate::hub::cache_hint(.path))]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{images_path} holds {images} images but {labels_path} holds {labels} labels; the two \
         files must come from the same set"
    )]
    CountMismatch {
        images_path: PathBuf,
        labels_path: PathBuf,
        images: usize,
        labels: usize,
    },
    #[error("{path}: label {label} at index {index} is not a digit class 0..=9")]
    LabelRange { path: PathBuf, index: usize, label: u8 },
    #[error(
        "{path} does not exist; point data.root (or {env}) at a folder holding mnist/ with the \
         IDX files, or set data.source = \"hub\"",
        env = crate::config::DATA_DIR_ENV
    )]
    MissingFile { path: PathBuf },
    #[error("{path}:{line}: {message}")]
    Amat {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "data.source = \"{source_kind}\" needs a local folder: set data.root or {env} (or an \
         absolute data.{key})",
        env = crate::config::DATA_DIR_ENV
    )]
    NoRoot { source_kind: String, key: &'static str },
    #[error("{what} has {have} images but the config asks for {need} (data.train_size + val_size + test_size)")]
    TooFewImages { what: String, have: usize, need: usize },
    #[error("{what}: images are {h1}×{w1} in one file and {h2}×{w2} in the other")]
    SizeMismatch {
        what: String,
        h1: usize,
        w1: usize,
        h2: usize,
        w2: usize,
    },
    #[error(
        "OOD set {name:?}: no t10k-images-idx3-ubyte[.gz] in any of {tried:?} and no Hub repo to \
         fall back to; set data.ood.path to an IDX folder holding the t10k files (relative to \
         data.root or absolute) or data.ood.hub_repo to a Hub dataset in MNIST's Parquet layout"
    )]
    OodNotFound { name: String, tried: Vec<PathBuf> },
    #[error("unknown split {name:?}; this config defines {known:?}")]
    UnknownSplit { name: String, known: Vec<String> },
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    #[error("rotating images: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// One split: "train", "val", "test" or "ood_<name>", from the cache when it is there (built
/// and cached first otherwise).
pub fn load_split(cfg: &Config, name: &str) -> Result<Split, DataError> {
    rot::load(cfg, name)
}

/// The images fine-tuning sees: train, plus val when `data.train_on_val`, cut to the first
/// `data.train_limit` when that is > 0. Named "train" or "train+val".
pub fn training_set(cfg: &Config) -> Result<Split, DataError> {
    train_images(cfg, cfg.data.train_on_val)
}

/// The images MAE pretraining sees (`pretrain.images`), named like `training_set`'s.
pub fn pretraining_set(cfg: &Config) -> Result<Split, DataError> {
    match cfg.pretrain.images {
        PretrainImages::FineTune => training_set(cfg),
        PretrainImages::Train => train_images(cfg, false),
        PretrainImages::TrainVal => train_images(cfg, true),
    }
}

fn train_images(cfg: &Config, with_val: bool) -> Result<Split, DataError> {
    let mut s = load_split(cfg, "train")?;
    if with_val && cfg.data.val_size > 0 {
        let v = load_split(cfg, "val")?;
        s.images.extend_from_slice(&v.images);
        s.labels.extend_from_slice(&v.labels);
        s.name = "train+val".into();
    }
    let limit = cfg.data.train_limit;
    if limit > 0 && limit < s.len() {
        s.images.truncate(limit * s.h * s.w);
        s.labels.truncate(limit);
    }
    Ok(s)
}
