//! The run directory: what an earlier run left in it, and preparing it for a new, resumed or
//! overwritten run (a folder that holds a run is never overwritten without `--overwrite`).

use super::checkpoint;
use super::error::TrainError;
use crate::config::Config;
use crate::report::angles::{angles_model, ANGLES_CSV};
use crate::report::{ReportError, METRICS_JSONL, SUMMARY_JSON};
use std::path::{Path, PathBuf};

/// File names inside a run directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
pub const CONFIG_FILE: &str = "config.toml";
/// The class names by index (`{"classes": [...]}`): digits "0".."9", or a photo folder's.
pub const CLASSES_FILE: &str = "classes.json";
/// The pretraining stage lives in its own sub-directory (checkpoint + metrics).
pub const PRETRAIN_DIR: &str = "pretrain";

/// How `train` begins with respect to the run directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: refused when the directory already holds one.
    New,
    /// Continue the run in the directory from its last checkpoint.
    Resume,
    /// Delete the run in the directory, then start a new one.
    Overwrite,
}

/// What a run directory holds of an earlier run, in words ("a run (training at step 40 of 120)"), or
/// `None` when it holds none. A folder with only `config.toml` (a start that failed before its
/// first checkpoint or evaluation) holds nothing to lose.
fn existing_run(dir: &Path) -> Option<String> {
    let stage_at = |ckpt: PathBuf, what: &str| {
        checkpoint::load_meta(&ckpt)
            .ok()
            .map(|m| match m.step == m.total_steps {
                true => format!("a run ({what} finished: step {} of {})", m.step, m.total_steps),
                false => format!("a run ({what} at step {} of {})", m.step, m.total_steps),
            })
    };
    if let Some(p) = stage_at(dir.join(CHECKPOINT), "training") {
        return Some(p);
    }
    if let Some(p) = stage_at(dir.join(PRETRAIN_DIR).join(CHECKPOINT), "pretraining") {
        return Some(format!("{}, fine-tuning not started)", p.trim_end_matches(')')));
    }
    if [
        dir.join(METRICS_JSONL),
        dir.join(SUMMARY_JSON),
        dir.join(PRETRAIN_DIR).join(METRICS_JSONL),
    ]
    .iter()
    .any(|p| p.exists())
    {
        return Some("a run (metrics but no checkpoint)".to_string());
    }
    measurements(dir)
}

/// Files that `eval --angles` and `lee --layerwise` write into the run folder of a config. In a
/// folder without a run they measured another model (the config's initial weights, or a
/// `--checkpoint` from elsewhere): a new run must not keep them beside its own files.
const MEASUREMENTS: [&str; 2] = [ANGLES_CSV, "lee_layerwise.csv"];

/// The measurements a folder holds, in words, naming the model of `angles.csv` when it says.
fn measurements(dir: &Path) -> Option<String> {
    let found: Vec<String> = MEASUREMENTS
        .iter()
        .filter(|f| dir.join(f).exists())
        .map(
            |f| match (*f == ANGLES_CSV).then(|| angles_model(&dir.join(f)).ok().flatten()) {
                Some(Some(model)) => format!("{f} of {model}"),
                _ => f.to_string(),
            },
        )
        .collect();
    (!found.is_empty()).then(|| format!("no run but measurements of another model ({})", found.join("; ")))
}

/// Create the run directory and save the resolved config in it: the first thing a run does,
/// so an unwritable directory fails before any data or model is loaded. A directory that holds
/// a run is refused unless the run resumes it or overwrites it (then it is deleted first).
pub(super) fn prepare_run_dir(cfg: &Config, start: Start) -> Result<PathBuf, TrainError> {
    let dir = cfg.run_dir();
    let fail = |source| TrainError::RunDir {
        path: dir.clone(),
        source,
    };
    if let Some(progress) = existing_run(&dir) {
        match start {
            Start::New => return Err(TrainError::RunExists { path: dir, progress }),
            Start::Overwrite => {
                eprintln!("{}: --overwrite: deleting what it held: {progress}", dir.display());
                std::fs::remove_dir_all(&dir).map_err(fail)?;
            }
            Start::Resume => {}
        }
    }
    std::fs::create_dir_all(&dir).map_err(fail)?;
    crate::report::write_atomic(&dir.join(CONFIG_FILE), cfg.to_toml().as_bytes()).map_err(|e| match e {
        ReportError::Io { source, .. } => fail(source),
        other => other.into(),
    })?;
    Ok(dir)
}
