//! The weights an inference command (`eval`, `lee`) measures, loaded through one checked path:
//! an explicit checkpoint, else the checkpoint in the config's run directory, else the config's
//! initial weights — but never, silently, a random model that only exists because a
//! pretraining stage has not run yet.

use super::checkpoint::{self, init_from_pretrain};
use super::error::TrainError;
use super::run_dir::{CHECKPOINT, PRETRAIN_DIR};
use crate::config::{Config, InitWeights};
use candle_core::Device;
use candle_nn::VarMap;
use std::path::{Path, PathBuf};

/// A model's variables and where they came from.
pub struct Loaded {
    pub varmap: VarMap,
    /// The checkpoint file loaded, if one was.
    pub checkpoint: Option<PathBuf>,
    /// In words, with the step when known (printed by the commands).
    pub source: String,
}

/// "checkpoint P (training step S of T)", the step read from the sidecar when there is one.
fn describe(path: &Path) -> String {
    match checkpoint::load_meta(path) {
        Ok(m) => format!(
            "checkpoint {} ({} step {} of {})",
            path.display(),
            m.stage,
            m.step,
            m.total_steps
        ),
        Err(_) => format!("checkpoint {}", path.display()),
    }
}

/// Build the config's model on `device` and fill it: from `checkpoint` when given, else from
/// `<run dir>/checkpoint.safetensors` when the run directory holds one, else as the config
/// initialises it. Checkpoints go through [`checkpoint::load_weights`] (every variable present
/// with its shape, nothing extra). With `init.weights = "pretrain"` and no checkpoint, the
/// pretrained encoder is used when its stage has run, and it is an error when it has not.
pub fn load_for_inference(cfg: &Config, checkpoint: Option<&Path>, device: &Device) -> Result<Loaded, TrainError> {
    let (varmap, _) = crate::models::build_model(cfg, device)?;
    let run_ckpt = cfg.run_dir().join(CHECKPOINT);
    let explicit = checkpoint.map(Path::to_path_buf);
    if let Some(path) = explicit.or_else(|| run_ckpt.exists().then(|| run_ckpt.clone())) {
        checkpoint::load_weights(&path, &varmap, device)?;
        return Ok(Loaded {
            varmap,
            source: describe(&path),
            checkpoint: Some(path),
        });
    }
    let source = match cfg.init.weights {
        InitWeights::Pretrain => {
            let pre = cfg.run_dir().join(PRETRAIN_DIR).join(CHECKPOINT);
            if !pre.exists() {
                return Err(TrainError::Invalid(format!(
                    "nothing to measure: {} holds no checkpoint, and this config starts from its own \
                     MAE pretraining (init.weights = \"pretrain\"), which has not run ({} does not \
                     exist), so the model would be random. Train it first (`liederiv train` with \
                     the same config), or pass --checkpoint",
                    cfg.run_dir().display(),
                    pre.display()
                )));
            }
            init_from_pretrain(&pre, &varmap, device)?;
            format!(
                "the pretrained encoder of {} with an untrained head (no fine-tuning checkpoint in {})",
                describe(&pre),
                cfg.run_dir().display()
            )
        }
        InitWeights::Random => format!(
            "the config's random initial weights (seed {}; no checkpoint in {})",
            cfg.seed,
            cfg.run_dir().display()
        ),
        other => format!(
            "the config's initial weights (init.weights = \"{other}\"; no checkpoint in {})",
            cfg.run_dir().display()
        ),
    };
    Ok(Loaded {
        varmap,
        checkpoint: None,
        source,
    })
}
