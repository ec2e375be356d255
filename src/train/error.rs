//! What can stop a training run (and loading a model for inference), in words a user can act on.

use super::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::report::ReportError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("run directory {path} is not writable: {source} (set output.dir to a writable folder)")]
    RunDir { path: PathBuf, source: std::io::Error },
    #[error(
        "run directory {path} already holds {progress}; nothing in it was changed. To go on: \
         `--resume` continues that run from its last checkpoint, `--set name=<another name>` starts \
         a new run beside it, or `--overwrite` deletes it and starts over"
    )]
    RunExists { path: PathBuf, progress: String },
    #[error("--resume: no checkpoint at {path}; run without --resume to start the run")]
    NoCheckpoint { path: PathBuf },
    #[error("--resume: the checkpoint {path} was written with a different config; resume with the same config and --set overrides, or start a new run (another `name`)")]
    ConfigChanged { path: PathBuf },
    #[error("{stage}: loss is {value} at step {step}; stopped. The last good checkpoint is {checkpoint} (lower the lr or enable train.grad_clip)")]
    NonFinite {
        stage: String,
        step: usize,
        value: f32,
        checkpoint: String,
    },
    #[error(transparent)]
    Device(#[from] crate::runtime::DeviceError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
