//! Photo splits: image files (or encoded images in memory), decoded and preprocessed per batch as timm prepares them
//! ([`super::preprocess`]: Pillow's arithmetic), in parallel on the loader threads (the rayon
//! pool). Only the paths are held, so a split costs its file list, not its pixels: 50k
//! ImageNet-val images are ~4 MB of paths here (~80 bytes each), against 30 GB as 224-px f32 tensors.
//!
//! Nothing is skipped: a file that cannot be read or decoded stops the run with its path; a
//! conversion (grey to RGB, RGB to grey, an alpha channel dropped) is done as PIL's
//! `convert` does and said once per process.

use super::preprocess::{self, Conversion, DecodeError, Image8};
use crate::config::{AugmentConfig, DataConfig};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Encoded photos (PNG / JPEG bytes): files under a folder, or images held in memory (a Hub
/// Parquet data set's image column).
#[derive(Clone, Debug, PartialEq)]
pub enum Photos {
    Files {
        /// The folder the paths are relative to (`data.folder`).
        base: PathBuf,
        /// One file per image, relative to `base`.
        files: Vec<PathBuf>,
    },
    Encoded {
        /// Where they came from, for messages: per image, e.g. `user/repo default/train/0000.parquet row 17`.
        names: Vec<String>,
        bytes: Vec<Arc<[u8]>>,
    },
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PhotoError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not a readable image ({source}); replace or remove it (every file in a class \
         folder is read, none is skipped)"
    )]
    Decode { path: PathBuf, source: DecodeError },
    #[error(
        "{path} does not exist; data.folder must hold train/ and test/ (and optionally val/), \
         each with one subfolder of PNG / JPEG files per class (torchvision's ImageFolder layout)"
    )]
    MissingFolder { path: PathBuf },
    #[error(
        "{path} has no class folders: it needs one subfolder per class holding PNG / JPEG files \
         (torchvision's ImageFolder layout)"
    )]
    NoClasses { path: PathBuf },
    #[error("{path}: class folder {class:?} holds no PNG / JPEG files")]
    EmptyClass { path: PathBuf, class: String },
    #[error(
        "{path}: class {class:?} is not among train's classes {train:?}; every split's class \
         folders must be train's (or some of them)"
    )]
    UnknownClass {
        path: PathBuf,
        class: String,
        train: Vec<String>,
    },
    #[error("{path}:{line}: {message}")]
    Csv {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("OOD set {name:?}: data.ood.rotate applies to digit sets only; set it to false for photos")]
    RotateOod { name: String },
}

/// Whether a conversion was already reported (once per process).
static CONVERSION_SAID: AtomicBool = AtomicBool::new(false);

impl Photos {
    pub fn len(&self) -> usize {
        match self {
            Photos::Files { files, .. } => files.len(),
            Photos::Encoded { bytes, .. } => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where image `i` comes from (a path, or a Parquet file and row).
    pub fn name(&self, i: usize) -> String {
        match self {
            Photos::Files { base, files } => base.join(&files[i]).display().to_string(),
            Photos::Encoded { names, .. } => names[i].clone(),
        }
    }

    /// Image `i` decoded to `channels` (1 or 3), as PIL's `Image.open(f).convert(...)`.
    pub fn load(&self, i: usize, channels: usize) -> Result<Image8, PhotoError> {
        let path = PathBuf::from(self.name(i));
        let (img, conv) = match self {
            Photos::Files { .. } => {
                let bytes = std::fs::read(&path).map_err(|source| PhotoError::Read {
                    path: path.clone(),
                    source,
                })?;
                preprocess::decode(&bytes, channels)
            }
            Photos::Encoded { bytes, .. } => preprocess::decode(&bytes[i], channels),
        }
        .map_err(|source| PhotoError::Decode {
            path: path.clone(),
            source,
        })?;
        if conv != Conversion::None && !CONVERSION_SAID.swap(true, Ordering::Relaxed) {
            let what = match conv {
                Conversion::GreyToRgb => "is grey: replicated to RGB (PIL's convert(\"RGB\"))",
                Conversion::RgbToGrey => "is colour: reduced to its luma (PIL's convert(\"L\"))",
                _ => "has an alpha channel: dropped (PIL's convert)",
            };
            eprintln!(
                "note: {} {what} for data.channels = {channels}; other images are converted the \
                 same way without a further note",
                path.display()
            );
        }
        Ok(img)
    }

    /// Its first `n` images.
    pub(super) fn truncate(&mut self, n: usize) {
        match self {
            Photos::Files { files, .. } => files.truncate(n),
            Photos::Encoded { names, bytes } => {
                names.truncate(n);
                bytes.truncate(n);
            }
        }
    }

    /// `other`'s images after its own (`None`: they are not of one kind).
    pub(super) fn append(&mut self, other: Photos) -> Option<()> {
        match (self, other) {
            (Photos::Files { base, files }, Photos::Files { base: b2, files: f2 }) => {
                files.extend(f2.into_iter().map(|f| match b2 == *base {
                    true => f,
                    false => b2.join(f),
                }));
            }
            (Photos::Encoded { names, bytes }, Photos::Encoded { names: n2, bytes: b2 }) => {
                names.extend(n2);
                bytes.extend(b2);
            }
            _ => return None,
        }
        Some(())
    }

    /// Files: per image its path under `base`, a NUL, its size in bytes (u64 LE) and its label
    /// (u32 LE). Encoded: per image its byte count (u64 LE), its bytes and its label.
    pub(super) fn fingerprint(&self, labels: &[u32], h: &mut Sha256) -> Result<(), PhotoError> {
        for (i, &l) in labels.iter().enumerate().take(self.len()) {
            match self {
                Photos::Files { base, files } => {
                    let path = base.join(&files[i]);
                    let size = std::fs::metadata(&path)
                        .map_err(|source| PhotoError::Read { path, source })?
                        .len();
                    h.update(files[i].to_string_lossy().as_bytes());
                    h.update([0]);
                    h.update(size.to_le_bytes());
                }
                Photos::Encoded { bytes, .. } => {
                    h.update((bytes[i].len() as u64).to_le_bytes());
                    h.update(&bytes[i]);
                }
            }
            h.update(l.to_le_bytes());
        }
        Ok(())
    }
}

/// How a batch's photos are cropped.
#[derive(Clone, Copy, Debug)]
pub enum Crop<'a> {
    /// timm's evaluation transform: resize the shorter side, centre crop (`data.crop_pct`).
    Eval,
    /// Training: `augment`'s random resized crop and flip, image k of the batch drawing from
    /// ChaCha8 seeded `seed`, stream k (the same batch whatever the threads' timing).
    Train { augment: &'a AugmentConfig, seed: u64 },
}

/// Images `indices` as `(B, C, S, S)` f32, normalised per channel.
pub(super) fn batch(
    photos: &Photos,
    indices: &[usize],
    data: &DataConfig,
    crop: Crop,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (s, c) = (data.image_size, data.channels);
    let mean: Vec<f64> = (0..c).map(|i| data.mean.get(i)).collect();
    let std: Vec<f64> = (0..c).map(|i| data.std.get(i)).collect();
    let interp = data.interpolation;
    let one = |k: usize, i: usize| -> Result<Vec<f32>, PhotoError> {
        let img = photos.load(i, c)?;
        let img = match crop {
            Crop::Eval => preprocess::eval_transform(&img, s, data.crop_pct, interp),
            Crop::Train { augment, seed } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(k as u64);
                let img = match augment.random_resized_crop {
                    true => {
                        let ([s0, s1], [r0, r1]) = (augment.crop_scale, augment.crop_ratio);
                        preprocess::random_resized_crop(&img, s, (s0, s1), (r0, r1), interp, &mut rng)
                    }
                    false => preprocess::eval_transform(&img, s, data.crop_pct, interp),
                };
                match augment.hflip > 0.0 && rng.random::<f64>() < augment.hflip {
                    true => preprocess::hflip(&img),
                    false => img,
                }
            }
        };
        Ok(preprocess::to_chw(&img, &mean, &std))
    };
    let images = indices
        .par_iter()
        .enumerate()
        .map(|(k, &i)| one(k, i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(candle_core::Error::wrap)?;
    Tensor::from_vec(images.concat(), (indices.len(), c, s, s), device)
}
