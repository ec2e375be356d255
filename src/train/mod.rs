//! Training: AdamW with parameter groups, the lr schedule, augmentation, checkpoints and the loop.
//! The loop is MAE's engine split (`train_one_epoch`-style steps and `evaluate`), written as one
//! readable function; the commands in `src/cli/` wire it up.

pub mod augment;
pub mod checkpoint;
pub mod engine;
mod error;
pub mod evaluate;
pub mod inference;
pub mod optim;
mod run_dir;
pub mod schedule;
pub mod zoo;

pub use augment::{soft_targets, Augmented, Augmenter};
pub use checkpoint::init_from_pretrain;
pub use engine::{train, RunSummary};
pub use error::TrainError;
pub use inference::{load_for_inference, Loaded};
pub use optim::{group_for, layer_id, AdamW, AdamWParams, Group, StepStats};
pub use run_dir::{Start, CHECKPOINT, CLASSES_FILE, CONFIG_FILE, PRETRAIN_DIR};
pub use schedule::Schedule;
