//! The run directory: what an earlier run left in it, and preparing it for a new, resumed or
//! overwritten run (a folder that holds a run is never overwritten without `--overwrite`).

use super::checkpoint;
use super::engine::{Start, TrainError, CHECKPOINT, CONFIG_FILE, PRETRAIN_DIR};
use crate::config::Config;
use crate::report::{ReportError, METRICS_JSONL, SUMMARY_JSON};
use std::path::{Path, PathBuf};

/// What a run directory holds of an earlier run, in words ("train stage at step 40 of 120"), or
/// `None` when it holds none. A folder with only `config.toml` (a start that failed before its
/// first checkpoint or evaluation) holds nothing to lose.
fn existing_run(dir: &Path) -> Option<String> {
    let stage_at = |ckpt: PathBuf, what: &str| {
        checkpoint::load_meta(&ckpt)
            .ok()
            .map(|m| match m.step == m.total_steps {
                true => format!("{what} finished: step {} of {}", m.step, m.total_steps),
                false => format!("{what} at step {} of {}", m.step, m.total_steps),
            })
    };
    if let Some(p) = stage_at(dir.join(CHECKPOINT), "training") {
        return Some(p);
    }
    if let Some(p) = stage_at(dir.join(PRETRAIN_DIR).join(CHECKPOINT), "pretraining") {
        return Some(format!("{p}, fine-tuning not started"));
    }
    [
        dir.join(METRICS_JSONL),
        dir.join(SUMMARY_JSON),
        dir.join(PRETRAIN_DIR).join(METRICS_JSONL),
    ]
    .iter()
    .any(|p| p.exists())
    .then(|| "metrics but no checkpoint".to_string())
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
                eprintln!("{}: --overwrite: deleting the earlier run ({progress})", dir.display());
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
