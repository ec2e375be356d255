//! Error and confidence against the rotation angle (`liederiv eval --angles`): one row per split
//! and angle θ, every image of the split rotated by θ more. Written as `angles.csv` in the run
//! folder and drawn as `angles.{png,svg}`; `liederiv report` overlays the runs that have one
//! (a learned model wobbles with θ, a C_N model repeats every 360°/N).

use super::{write_atomic, ReportError};
use std::path::Path;

pub const ANGLES_CSV: &str = "angles.csv";

/// One split at one extra rotation.
#[derive(Clone, Debug, PartialEq)]
pub struct AnglePoint {
    pub split: String,
    pub degrees: f64,
    pub n: usize,
    /// Top-1 error in [0, 1].
    pub error: f64,
    /// Mean softmax probability of the true class.
    pub true_prob: f64,
}

const HEADER: &str = "split,degrees,n,error,true_class_prob";
const MODEL_LINE: &str = "# model: ";

/// What an angles CSV says it measured (its `# model:` line), if it says.
pub fn angles_model(path: &Path) -> Result<Option<String>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(path, e))?;
    Ok(text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(MODEL_LINE))
        .map(str::to_string))
}

/// Write the curve; its first line, `# model: <model>`, names what was measured (the checkpoint
/// and its step, or the initial weights), so a file found in a run folder says whose it is.
pub fn write_angles(path: &Path, model: &str, points: &[AnglePoint]) -> Result<(), ReportError> {
    let mut s = format!("{MODEL_LINE}{}\n{HEADER}\n", model.replace('\n', " "));
    for p in points {
        s += &format!("{},{},{},{},{}\n", p.split, p.degrees, p.n, p.error, p.true_prob);
    }
    write_atomic(path, s.as_bytes())
}

pub fn read_angles(path: &Path) -> Result<Vec<AnglePoint>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ReportError::io(path, e))?;
    let bad = |line: usize, message: &str| ReportError::Invalid {
        what: format!("{}:{line}", path.display()),
        message: message.to_string(),
    };
    // The `# model:` line (absent in files written before it existed), then the header.
    let skip = usize::from(text.starts_with(MODEL_LINE));
    let mut lines = text.lines().skip(skip);
    if lines.next() != Some(HEADER) {
        return Err(bad(1 + skip, &format!("expected the header {HEADER}")));
    }
    lines
        .enumerate()
        .map(|(i, l)| {
            let f: Vec<&str> = l.split(',').collect();
            let num = |k: usize| f.get(k).and_then(|v| v.parse::<f64>().ok());
            match (f.first(), num(1), f.get(2).and_then(|v| v.parse().ok()), num(3), num(4)) {
                (Some(s), Some(degrees), Some(n), Some(error), Some(true_prob)) if f.len() == 5 => Ok(AnglePoint {
                    split: s.to_string(),
                    degrees,
                    n,
                    error,
                    true_prob,
                }),
                _ => Err(bad(i + 2 + skip, "expected split,degrees,n,error,true_class_prob")),
            }
        })
        .collect()
}

/// One curve of the angle plot: a label and its (degrees, error %, true-class probability).
pub type AngleSeries = (String, Vec<(f64, f64, f64)>);

/// The curve of one split, labelled `label`.
pub fn series_of(points: &[AnglePoint], split: &str, label: &str) -> AngleSeries {
    let pts = points
        .iter()
        .filter(|p| p.split == split)
        .map(|p| (p.degrees, 100.0 * p.error, p.true_prob))
        .collect();
    (label.to_string(), pts)
}

/// The pointwise mean of curves (a row's seeds), labelled `label`: at the angles every curve has.
pub fn mean_series(label: &str, curves: &[AngleSeries]) -> AngleSeries {
    let Some((_, first)) = curves.first() else {
        return (label.to_string(), Vec::new());
    };
    let pts = first
        .iter()
        .filter_map(|&(deg, _, _)| {
            let at: Vec<(f64, f64)> = curves
                .iter()
                .filter_map(|(_, c)| c.iter().find(|p| p.0 == deg).map(|p| (p.1, p.2)))
                .collect();
            let k = at.len() as f64;
            (at.len() == curves.len()).then(|| {
                let (e, p) = at.iter().fold((0.0, 0.0), |(se, sp), (e, p)| (se + e, sp + p));
                (deg, e / k, p / k)
            })
        })
        .collect();
    (label.to_string(), pts)
}

/// Console table: one line per angle, error and true-class probability per split.
pub fn angles_table(points: &[AnglePoint]) -> String {
    let splits: std::collections::BTreeSet<&str> = points.iter().map(|p| p.split.as_str()).collect();
    let mut s = format!("{:>8}", "θ (°)");
    for sp in &splits {
        s += &format!("{:>18}{:>14}", format!("{sp} error"), "p(true)");
    }
    s.push('\n');
    let mut degrees: Vec<f64> = points.iter().map(|p| p.degrees).collect();
    degrees.sort_by(f64::total_cmp);
    degrees.dedup();
    for d in degrees {
        s += &format!("{d:>8.1}");
        for sp in &splits {
            match points.iter().find(|p| p.split == *sp && p.degrees == d) {
                Some(p) => s += &format!("{:>17.2}%{:>14.4}", 100.0 * p.error, p.true_prob),
                None => s += &format!("{:>18}{:>14}", "–", "–"),
            }
        }
        s.push('\n');
    }
    s
}
