//! The files of a model zoo (`liederiv zoo`): per model a results JSON and a per-image CSV (what
//! the authors' scripts' users asked for), the zoo's table (Markdown and CSV), the paper's
//! Figure-1 view (error against LEE, one colour per family) and each model's layerwise bars.

use super::plot::{plot_family_error_vs_lee, plot_layerwise_bars, ScatterPoint};
use super::{write_atomic, ReportError};
use crate::jvp::StepKind;
use crate::lie::MeanStderr;
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn mean_stderr(m: &MeanStderr) -> serde_json::Value {
    json!({"mean": m.mean(), "stderr": m.stderr()})
}

/// One model's results over all its images.
#[derive(Debug)]
pub struct ModelResult {
    pub name: String,
    pub family: String,
    pub kind: String,
    pub source: String,
    pub parameters: usize,
    pub split: String,
    pub n: usize,
    pub error_pct: f64,
    /// Per transform: mean and standard error over images.
    pub lee: Vec<(String, MeanStderr)>,
    pub layerwise: Vec<LayerwiseResult>,
    /// Per image: label, prediction and the LEE per transform (the CSV).
    pub images: Vec<(u32, u32, Vec<f64>)>,
}

/// A model's layerwise decomposition of one transform over its images.
#[derive(Debug)]
pub struct LayerwiseResult {
    pub transform: String,
    pub end_to_end: MeanStderr,
    pub steps: Vec<(String, StepKind, MeanStderr)>,
}

/// A model's results as its JSON document.
pub fn model_json(r: &ModelResult) -> serde_json::Value {
    let lee: serde_json::Map<String, serde_json::Value> =
        r.lee.iter().map(|(t, m)| (t.clone(), mean_stderr(m))).collect();
    let layerwise: Vec<serde_json::Value> = r
        .layerwise
        .iter()
        .map(|l| {
            json!({
                "transform": l.transform,
                "end_to_end": mean_stderr(&l.end_to_end),
                "steps": l.steps.iter().map(|(s, k, m)| json!({
                    "step": s, "kind": k, "mean": m.mean(), "stderr": m.stderr(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "name": r.name,
        "family": r.family,
        "kind": r.kind,
        "source": r.source,
        "parameters": r.parameters,
        "split": r.split,
        "n": r.n,
        "error_pct": r.error_pct,
        "lee": lee,
        "layerwise": layerwise,
    })
}

/// One row per image: index, label, prediction, correct, LEE per transform.
pub fn model_csv(r: &ModelResult) -> String {
    let mut s = String::from("image,label,prediction,correct");
    for (t, _) in &r.lee {
        let _ = write!(s, ",lee_{t}");
    }
    s.push('\n');
    for (i, (y, p, lee)) in r.images.iter().enumerate() {
        let _ = write!(s, "{i},{y},{p},{}", u8::from(y == p));
        for v in lee {
            let _ = write!(s, ",{v:e}");
        }
        s.push('\n');
    }
    s
}

/// The zoo's table: model, family, parameters, images, error, LEE per transform (mean ± s.e.).
pub fn zoo_table(results: &[ModelResult]) -> String {
    let Some(first) = results.first() else {
        return String::new();
    };
    let mut s = String::from("| model | family | parameters | images | error (%) |");
    for (t, _) in &first.lee {
        let _ = write!(s, " LEE {t} |");
    }
    s.push_str("\n|:--|:--|--:|--:|--:|");
    s.push_str(&"--:|".repeat(first.lee.len()));
    s.push('\n');
    for r in results {
        let _ = write!(
            s,
            "| {} | {} | {} | {} | {:.2} |",
            r.name, r.family, r.parameters, r.n, r.error_pct
        );
        for (_, m) in &r.lee {
            let _ = write!(s, " {:.3e} ± {:.1e} |", m.mean(), m.stderr());
        }
        s.push('\n');
    }
    s
}

/// The same table as CSV (means and standard errors in their own columns).
pub fn zoo_csv(results: &[ModelResult]) -> String {
    let Some(first) = results.first() else {
        return String::new();
    };
    let mut s = String::from("model,family,kind,parameters,split,images,error_pct");
    for (t, _) in &first.lee {
        let _ = write!(s, ",lee_{t},lee_{t}_stderr");
    }
    s.push('\n');
    for r in results {
        let _ = write!(
            s,
            "{},{},{},{},{},{},{}",
            r.name, r.family, r.kind, r.parameters, r.split, r.n, r.error_pct
        );
        for (_, m) in &r.lee {
            let _ = write!(s, ",{:e},{:e}", m.mean(), m.stderr());
        }
        s.push('\n');
    }
    s
}

/// Write every file of the zoo into `out`; returns their paths.
pub fn write_zoo(out: &Path, results: &[ModelResult]) -> Result<Vec<PathBuf>, ReportError> {
    let mut written = Vec::new();
    let models = out.join("models");
    std::fs::create_dir_all(&models).map_err(|e| ReportError::Io {
        path: models.clone(),
        source: e,
    })?;
    for r in results {
        let json_path = models.join(format!("{}.json", r.name));
        let doc = serde_json::to_string_pretty(&model_json(r)).map_err(|e| ReportError::Invalid {
            what: json_path.display().to_string(),
            message: e.to_string(),
        })?;
        write_atomic(&json_path, (doc + "\n").as_bytes())?;
        let csv_path = models.join(format!("{}.csv", r.name));
        write_atomic(&csv_path, model_csv(r).as_bytes())?;
        written.extend([json_path, csv_path]);
        if !r.layerwise.is_empty() {
            let stem = models.join(format!("{}_layerwise", r.name));
            let names: Vec<String> = r.layerwise[0].steps.iter().map(|(s, _, _)| s.clone()).collect();
            let lines: Vec<(String, Vec<f64>)> = r
                .layerwise
                .iter()
                .map(|l| (l.transform.clone(), l.steps.iter().map(|(_, _, m)| m.mean()).collect()))
                .collect();
            let title = format!("{}: layerwise LEE by step ({} images)", r.name, r.n);
            plot_layerwise_bars(&stem, &title, &lines, &names)?;
            written.extend([stem.with_extension("png"), stem.with_extension("svg")]);
        }
    }
    for (name, text) in [("zoo.md", zoo_table(results)), ("zoo.csv", zoo_csv(results))] {
        let path = out.join(name);
        write_atomic(&path, text.as_bytes())?;
        written.push(path);
    }
    if let Some(first) = results.first() {
        for (t, (transform, _)) in first.lee.iter().enumerate() {
            let points: Vec<(ScatterPoint, String)> = results
                .iter()
                .map(|r| {
                    (
                        ScatterPoint {
                            label: r.name.clone(),
                            test_error_pct: r.error_pct,
                            lee: r.lee[t].1.mean(),
                            lee_stderr: r.lee[t].1.stderr(),
                        },
                        r.family.clone(),
                    )
                })
                .collect();
            let stem = out.join(format!("error_vs_lee_{transform}"));
            plot_family_error_vs_lee(&stem, transform, &first.split, &points)?;
            written.extend([stem.with_extension("png"), stem.with_extension("svg")]);
        }
    }
    Ok(written)
}
