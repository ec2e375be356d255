//! MNIST and its rotated benchmark: IDX / `.amat` / Hub sources, the regenerated MNIST-rot
//! splits (DESIGN.md, "MNIST-rot"), out-of-distribution sets, and the batch loader.
//!
//! Owns: reading and validating the sources ([`idx`], [`amat`], [`hub_mnist`]), building and
//! caching the splits ([`rot`]), and turning a split into normalized tensors ([`batch`]). Does
//! not own the warp itself (`crate::transforms::apply`, shared with the LEE code) nor on-the-fly
//! augmentation (`train`).

pub mod amat;
mod folder;
pub mod hub_mnist;
pub mod idx;
mod loader;
pub mod parquet;
pub mod photos;
pub mod preprocess;
mod rot;

pub use loader::{batch, epoch_order, rotated_batch, train_batch};
pub use rot::{cache_path, mnist_pool, mnist_rot_draw, rotate_images};

/// Where split `name` is read from: a photo folder's split folder, else the cache file of the
/// regenerated digit split.
pub fn location(cfg: &Config, name: &str) -> Result<PathBuf, DataError> {
    match cfg.data.source {
        DataSource::Folder => folder::split_dir(cfg, name),
        DataSource::Parquet => Ok(PathBuf::from(format!("hub:{}", cfg.data.parquet.repo))),
        _ => cache_path(cfg, name),
    }
}

use crate::config::{Config, DataSource, PretrainImages};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Digit classes of MNIST and Fashion-MNIST.
pub const NUM_CLASSES: usize = 10;

/// One named set of images with their labels (class indices into `classes`).
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub name: String,
    pub images: Images,
    pub labels: Vec<u32>,
    /// Class names, by index: "0".."9" for digits, the sorted folder names for photos.
    pub classes: Vec<String>,
}

/// Where a split's pixels are.
#[derive(Clone, Debug, PartialEq)]
pub enum Images {
    /// In memory: n·h·w grey values in [0, 1], row-major (MNIST and what is made from it),
    /// resized and normalised per batch.
    Grey { pixels: Vec<f32>, h: usize, w: usize },
    /// Encoded photos, decoded and preprocessed per batch on the loader threads (files: only
    /// their paths are held).
    Photos(photos::Photos),
}

impl Split {
    /// A split of digits 0..=9.
    pub fn digits(name: &str, pixels: Vec<f32>, labels: &[u8], h: usize, w: usize) -> Self {
        Split {
            name: name.into(),
            images: Images::Grey { pixels, h, w },
            labels: labels.iter().map(|&l| l as u32).collect(),
            classes: (0..NUM_CLASSES).map(|c| c.to_string()).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// SHA-256 (hex), the fingerprint `data info` prints so that determinism can be checked
    /// from outside. Digits: the image floats as little-endian bytes, then one byte per label.
    /// Photos: per image its path under the folder, a NUL, its file size and label (u64 / u32
    /// LE) — the files themselves are not read.
    pub fn sha256(&self) -> Result<String, DataError> {
        let mut h = Sha256::new();
        match &self.images {
            Images::Grey { pixels, .. } => {
                for chunk in pixels.chunks(1 << 16) {
                    let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
                    h.update(&bytes);
                }
                // Digit labels are < 10: one byte each, as the fingerprint always was.
                h.update(self.labels.iter().map(|&l| l as u8).collect::<Vec<u8>>());
            }
            Images::Photos(p) => p.fingerprint(&self.labels, &mut h)?,
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for &l in &self.labels {
            if let Some(slot) = c.get_mut(l as usize) {
                *slot += 1;
            }
        }
        c
    }

    /// Its first `n` images.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len() {
            return;
        }
        self.labels.truncate(n);
        match &mut self.images {
            Images::Grey { pixels, h, w } => pixels.truncate(n * *h * *w),
            Images::Photos(p) => p.truncate(n),
        }
    }

    /// `other`'s images after its own, named `name`.
    fn extend(&mut self, other: Split, name: &str) -> Result<(), DataError> {
        let mismatch = || DataError::Incompatible {
            what: format!("{} and {}", self.name, other.name),
        };
        if self.classes != other.classes {
            return Err(mismatch());
        }
        match (&mut self.images, other.images) {
            (
                Images::Grey { pixels, h, w },
                Images::Grey {
                    pixels: p2,
                    h: h2,
                    w: w2,
                },
            ) if (*h, *w) == (h2, w2) => pixels.extend_from_slice(&p2),
            (Images::Photos(a), Images::Photos(b)) => a.append(b).ok_or_else(mismatch)?,
            _ => return Err(mismatch()),
        }
        self.labels.extend_from_slice(&other.labels);
        self.name = name.into();
        Ok(())
    }
}

/// Items and their labels reordered round-robin over the classes (class 0's first, class 1's
/// first, …, class 0's second, …; each class's own order kept), so that any first N are spread
/// evenly over the classes: photo sets are listed (folders) or often stored (Parquet) class by
/// class, where "the first N" would be a few classes only.
pub fn interleave_classes<T>(items: Vec<T>, labels: Vec<u32>) -> (Vec<T>, Vec<u32>) {
    let k = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let mut by_class: Vec<std::collections::VecDeque<T>> = (0..k).map(|_| Default::default()).collect();
    for (item, &l) in items.into_iter().zip(&labels) {
        by_class[l as usize].push_back(item);
    }
    let (mut out, mut out_labels) = (Vec::with_capacity(labels.len()), Vec::with_capacity(labels.len()));
    while out.len() < labels.len() {
        for (c, q) in by_class.iter_mut().enumerate() {
            if let Some(item) = q.pop_front() {
                out.push(item);
                out_labels.push(c as u32);
            }
        }
    }
    (out, out_labels)
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
    #[error(
        "OOD set {name:?}: with data.source = \"parquet\" an OOD set is another Hub repo in the same \
         layout; set its hub_repo (its data.parquet.test split is read) and rotate = false"
    )]
    ParquetOod { name: String },
    #[error("{what} cannot be joined: their classes or image kinds differ")]
    Incompatible { what: String },
    #[error(transparent)]
    Photo(#[from] photos::PhotoError),
    #[error("rotating images: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// One split: "train", "val", "test" or "ood_<name>", from the cache when it is there (built
/// and cached first otherwise).
pub fn load_split(cfg: &Config, name: &str) -> Result<Split, DataError> {
    let mut photos = match cfg.data.source {
        DataSource::Folder => folder::load(cfg, name)?,
        DataSource::Parquet => parquet::load(cfg, name)?,
        _ => return rot::load(cfg, name),
    };
    // A photo OOD set's `limit` (the digit sets apply theirs when they are built and cached).
    if let Some(o) = cfg.data.ood.iter().find(|o| format!("ood_{}", o.name) == name) {
        if o.limit > 0 {
            photos.truncate(o.limit);
        }
    }
    Ok(photos)
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
    let has_val = match cfg.data.source {
        DataSource::Folder | DataSource::Parquet => cfg.split_names().iter().any(|n| n == "val"),
        _ => cfg.data.val_size > 0,
    };
    if with_val && has_val {
        s.extend(load_split(cfg, "val")?, "train+val")?;
    }
    if cfg.data.train_limit > 0 {
        s.truncate(cfg.data.train_limit);
    }
    Ok(s)
}
