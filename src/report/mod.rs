//! Reporting: what a run leaves behind for people to read. The per-eval metrics log
//! (`metrics.jsonl` + `metrics.csv`, [`log`]), the plots (accuracy and LEE over training, the
//! paper's Figure-4 layerwise view and Figure-1-right error-vs-LEE scatter, [`plot`]) and the
//! markdown table of final metrics across runs with differences between rows over seeds
//! ([`table`], [`stats`]), and the `lee` command's tables, CSV and JSON schema ([`lee`]). This
//! module only serialises, summarises over seeds and draws: the numbers come from the trainer and
//! the LEE engine.

pub mod angles;
pub mod lee;
pub mod log;
pub mod plot;
pub mod stats;
pub mod table;
pub mod tensorboard;
pub mod zoo;

pub use log::{
    eval_heading, eval_table, read_jsonl, EvalRecord, MeanStderr, MetricsLog, SplitMetrics, METRICS_CSV, METRICS_JSONL,
};
pub use plot::{
    plot_angles, plot_error_vs_lee, plot_layerwise, plot_row_lee, plot_rows_error_vs_lee, plot_training, RowPoint,
    ScatterPoint,
};
pub use table::{
    comparison_table, load_run, markdown_table, paper_table, row_of, rows_of, seed_table, Comparison, PaperNumbers,
    PaperRow, RunReport, RunSummary, COMPARED_TRANSFORM, CONFIG_TOML, SUMMARY_JSON,
};

use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of the reporting code; each names the file it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: not a metrics record ({source}); the file may be from another version or hand-edited")]
    Json {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
    #[error("cannot serialise a metrics record: {0}")]
    Serialize(serde_json::Error),
    #[error("metrics at step {step}: `{field}` is {value}, not finite; refusing to log it (the run should stop on non-finite values)")]
    NonFinite { step: usize, field: String, value: f64 },
    #[error("cannot draw {path}: {message}")]
    Plot { path: PathBuf, message: String },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

impl ReportError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over `path`, so readers (and a resumed run) never see a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let tmp = crate::runtime::temp_sibling(path, "");
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(ReportError::io(path, e));
    }
    Ok(())
}

/// Reading order of split names: train, val, test, then the rest (OOD sets).
pub(crate) fn split_rank(split: &str) -> u8 {
    match split {
        "train" => 0,
        "val" => 1,
        "test" => 2,
        _ => 3,
    }
}
