//! MNIST and Fashion-MNIST from the Hugging Face Hub when no local folder has them: the dataset
//! viewer's Parquet conversion of a repo (revision `refs/convert/parquet`, files
//! `<config>/<split>/0000.parquet`, where the config is the repo's name: `ylecun/mnist` →
//! `mnist/train/0000.parquet`, `zalando-datasets/fashion_mnist` →
//! `fashion_mnist/test/0000.parquet`). Each row is `{image: {bytes: PNG, path: string}, label:
//! int64}` (the `datasets` Image feature); the PNGs are 8-bit greyscale 28×28. Rows are read by
//! [`super::parquet`], the PNGs decoded with `png`.

use super::{DataError, Digits};
use crate::hub::{self, HubSource, RepoKind};
use std::path::{Path, PathBuf};

/// The file of one split (`train` or `test`) of `repo` inside the repo.
pub fn file_name(repo: &str, split: &str) -> String {
    let config = repo.rsplit('/').next().unwrap_or(repo);
    format!("{config}/{split}/0000.parquet")
}

/// Fetch (or find in the Hub cache) the Parquet file of each of `splits` of `repo`.
pub fn fetch(repo: &str, splits: &[&str], cache_dir: Option<&Path>, offline: bool) -> Result<Vec<PathBuf>, DataError> {
    let src = HubSource {
        repo,
        kind: RepoKind::Dataset,
        revision: super::parquet::REVISION,
        cache_dir,
        offline,
        endpoint: None,
    };
    splits
        .iter()
        .map(|split| Ok(hub::fetch(&src, &file_name(repo, split))?))
        .collect()
}

/// Decode one 8-bit greyscale PNG into (pixels, h, w).
fn decode_png(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize), String> {
    let mut reader = png::Decoder::new(bytes).read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    if info.color_type != png::ColorType::Grayscale || info.bit_depth != png::BitDepth::Eight {
        return Err(format!(
            "{:?} {:?} image; expected 8-bit greyscale",
            info.color_type, info.bit_depth
        ));
    }
    buf.truncate(info.buffer_size());
    Ok((buf, info.height as usize, info.width as usize))
}

/// Read a Hub MNIST Parquet file into digits (labels checked to be 0..=9, all images one size).
pub fn read(path: &Path) -> Result<Digits, DataError> {
    let corrupt = |message: String| DataError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let rows = super::parquet::read_rows(path, "image", "label")?;
    let mut out = Digits {
        images: Vec::new(),
        labels: Vec::new(),
        h: 0,
        w: 0,
    };
    for (index, (png_bytes, label)) in rows.images.iter().zip(rows.labels).enumerate() {
        let label = u8::try_from(label)
            .ok()
            .filter(|l| *l <= 9)
            .ok_or(DataError::LabelRange {
                path: path.to_path_buf(),
                index,
                label: label.clamp(0, 255) as u8,
            })?;
        let (pixels, h, w) = decode_png(png_bytes).map_err(|m| corrupt(format!("row {index}: PNG: {m}")))?;
        if index == 0 {
            (out.h, out.w) = (h, w);
        } else if (h, w) != (out.h, out.w) {
            return Err(corrupt(format!(
                "row {index} is {h}×{w}, row 0 was {}×{}",
                out.h, out.w
            )));
        }
        out.images.extend_from_slice(&pixels);
        out.labels.push(label);
    }
    Ok(out)
}
