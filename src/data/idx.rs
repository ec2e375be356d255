//! The IDX format of LeCun's MNIST files (and Fashion-MNIST's): a big-endian header — magic
//! 2051 (`0x00000803`, u8 images, 3 dims) or 2049 (`0x00000801`, u8 labels, 1 dim), then the
//! dimensions — then the raw bytes. Files may be gzip-compressed; that is detected from the
//! content (magic `1f 8b`), not the name. Every malformed input is an error naming the file;
//! nothing here panics on corrupt data.

use super::{DataError, Digits};
use std::io::Read;
use std::path::{Path, PathBuf};

const IMAGES_MAGIC: u32 = 2051;
const LABELS_MAGIC: u32 = 2049;

/// The bytes of `path`, gunzipped when they start with the gzip magic.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Corrupt {
                path: path.to_path_buf(),
                message: format!("not a valid gzip stream ({e}); the download is probably truncated"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Check the magic and that the payload is exactly `header + expected` bytes long.
fn check_layout(bytes: &[u8], path: &Path, magic: u32, header: usize) -> Result<(), DataError> {
    let found = be_u32(bytes, 0).ok_or_else(|| DataError::Truncated {
        path: path.to_path_buf(),
        expected: header as u64,
        actual: bytes.len() as u64,
    })?;
    if found != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected: magic,
            found,
        });
    }
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header as u64,
            actual: bytes.len() as u64,
        });
    }
    Ok(())
}

fn check_len(bytes: &[u8], path: &Path, expected: u64) -> Result<(), DataError> {
    let actual = bytes.len() as u64;
    if actual < expected {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    if actual > expected {
        return Err(DataError::Corrupt {
            path: path.to_path_buf(),
            message: format!(
                "{} trailing bytes after the {expected} the header announces",
                actual - expected
            ),
        });
    }
    Ok(())
}

/// Parse an images file: returns (pixels n·h·w, n, h, w). `path` only names the file in errors.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, usize, usize, usize), DataError> {
    check_layout(bytes, path, IMAGES_MAGIC, 16)?;
    // Header: magic, n, rows, cols (u32 BE each); the layout check guarantees 16 bytes.
    let [n, h, w] = [4, 8, 12].map(|at| be_u32(bytes, at).unwrap_or(0) as u64);
    if h == 0 || w == 0 {
        return Err(DataError::Corrupt {
            path: path.to_path_buf(),
            message: format!("image dimensions {h}×{w} in the header"),
        });
    }
    // Saturating: absurd header dimensions become "truncated", never an overflow.
    check_len(bytes, path, n.saturating_mul(h).saturating_mul(w).saturating_add(16))?;
    Ok((bytes[16..].to_vec(), n as usize, h as usize, w as usize))
}

/// Parse a labels file; every label must be a digit class 0..=9.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>, DataError> {
    check_layout(bytes, path, LABELS_MAGIC, 8)?;
    let n = be_u32(bytes, 4).unwrap_or(0) as u64;
    check_len(bytes, path, n.saturating_add(8))?;
    let labels = bytes[8..].to_vec();
    if let Some((index, &label)) = labels.iter().enumerate().find(|(_, &l)| l > 9) {
        return Err(DataError::LabelRange {
            path: path.to_path_buf(),
            index,
            label,
        });
    }
    Ok(labels)
}

/// `<dir>/<prefix>-<kind>-ubyte`, with or without `.gz`, whichever exists (`.gz` first).
pub fn find_file(dir: &Path, prefix: &str, kind: &str) -> Result<PathBuf, DataError> {
    let stem = format!("{prefix}-{kind}-ubyte");
    [format!("{stem}.gz"), stem.clone()]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::MissingFile {
            path: dir.join(format!("{stem}[.gz]")),
        })
}

/// The images and labels of `<dir>/<prefix>-{images-idx3,labels-idx1}-ubyte[.gz]` (`prefix` is
/// `train` or `t10k`), validated against each other. Also returns the two paths read.
pub fn read_pair(dir: &Path, prefix: &str) -> Result<(Digits, [PathBuf; 2]), DataError> {
    let ip = find_file(dir, prefix, "images-idx3")?;
    let lp = find_file(dir, prefix, "labels-idx1")?;
    let (images, n, h, w) = parse_images(&read_maybe_gz(&ip)?, &ip)?;
    let labels = parse_labels(&read_maybe_gz(&lp)?, &lp)?;
    if labels.len() != n {
        return Err(DataError::CountMismatch {
            images_path: ip,
            labels_path: lp,
            images: n,
            labels: labels.len(),
        });
    }
    Ok((Digits { images, labels, h, w }, [ip, lp]))
}
