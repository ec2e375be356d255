//! The original MNIST-rot files of Larochelle et al. (2007):
//! `mnist_all_rotation_normalized_float_{train_valid,test}.amat`, one digit per line — 784
//! whitespace-separated floats in [0, 1] (row-major 28×28), then the label as a float.
//! `train_valid` holds 12,000 rows (the first 10,000 are train, the last 2,000 validation) and
//! `test` 50,000. The digits are already rotated, so they are used as they are.

use super::DataError;
use std::path::Path;

/// Pixels per row of an `.amat` file (28×28).
pub const PIXELS: usize = 784;

/// File names inside `data.amat_dir`.
pub const TRAIN_VALID: &str = "mnist_all_rotation_normalized_float_train_valid.amat";
pub const TEST: &str = "mnist_all_rotation_normalized_float_test.amat";

/// Parse `.amat` text into (images n·784 in [0, 1], labels). `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<(Vec<f32>, Vec<u8>), DataError> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let bad = |line: usize, message: String| DataError::Amat {
        path: path.to_path_buf(),
        line,
        message,
    };
    for (k, row) in text.lines().enumerate() {
        let line = k + 1;
        if row.trim().is_empty() {
            continue;
        }
        let mut count = 0;
        let mut label = None;
        for tok in row.split_whitespace() {
            let v: f32 = tok.parse().map_err(|_| bad(line, format!("{tok:?} is not a number")))?;
            if count < PIXELS {
                if !(0.0..=1.0).contains(&v) {
                    return Err(bad(line, format!("pixel {count} = {v} is outside [0, 1]")));
                }
                images.push(v);
            } else {
                label = Some(v);
            }
            count += 1;
        }
        if count != PIXELS + 1 {
            return Err(bad(
                line,
                format!("{count} values, expected {} (784 pixels + label)", PIXELS + 1),
            ));
        }
        let label = label.unwrap_or(-1.0);
        if label.fract() != 0.0 || !(0.0..=9.0).contains(&label) {
            return Err(bad(line, format!("label {label} is not a digit class 0..=9")));
        }
        labels.push(label as u8);
    }
    Ok((images, labels))
}

/// Read and parse one `.amat` file.
pub fn read(path: &Path) -> Result<(Vec<f32>, Vec<u8>), DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}
