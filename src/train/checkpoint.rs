//! Checkpoints: one safetensors file (the model's variables under their own names, the AdamW
//! state under `optim.m.*` / `optim.v.*`) and a JSON sidecar beside it (resolved config, step,
//! schedule position, metrics, RNG and data-order state) — nanoGPT's checkpoint dict, split into
//! a tensor file and a readable one. Both are written atomically (temp file + rename), the
//! sidecar last, so a run killed mid-write keeps its previous complete checkpoint.

use crate::models::Rng;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Prefix of optimiser tensors inside a checkpoint (never model weights).
pub const OPTIM_PREFIX: &str = "optim.";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path} does not exist (expected the .safetensors file and its .json sidecar; train first, or point --checkpoint at an existing file)")]
    Missing { path: PathBuf },
    #[error(
        "cannot write checkpoint {path}: {source} (check that the run directory is writable and the disk has space)"
    )]
    Write { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path} is unreadable: {message}")]
    Format { path: PathBuf, message: String },
    #[error("checkpoint {path} does not fit this model ({} mismatches; was it written with another model config?):\n  {}", problems.len(), problems.join("\n  "))]
    Mismatch { path: PathBuf, problems: Vec<String> },
}

/// The exact position of a ChaCha8 stream: restoring it continues the same sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key, hex.
    pub seed: String,
    pub stream: u64,
    /// Word position in the stream (u128, as a decimal string: JSON numbers stop at 2^53).
    pub word_pos: String,
}

impl RngState {
    pub fn of(rng: &Rng) -> Self {
        Self {
            seed: hex::encode(rng.get_seed()),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<Rng, String> {
        let bytes = hex::decode(&self.seed).map_err(|e| format!("rng seed: {e}"))?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| "rng seed: not 32 bytes".to_string())?;
        let word_pos: u128 = self.word_pos.parse().map_err(|e| format!("rng word_pos: {e}"))?;
        let mut rng = Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// Everything but the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// "pretrain" or "train": which stage wrote it.
    pub stage: String,
    /// Optimiser steps completed (the schedule position: the next step's lr is `lr_at(step)`).
    pub step: usize,
    /// Steps the stage runs in all; `step == total_steps` marks a finished stage.
    pub total_steps: usize,
    /// Data order: the epoch being read and the next position in its order.
    pub epoch: usize,
    pub cursor: usize,
    /// The training RNG (augmentation, dropout, masking).
    pub rng: RngState,
    /// Sum and count of the micro-batch losses since the last eval (the next record's
    /// `train_loss`), so a resumed run logs the same mean.
    pub loss_sum: f64,
    pub loss_count: usize,
    /// The last evaluation's metrics (free-form JSON).
    pub metrics: serde_json::Value,
    /// The resolved config, TOML.
    pub config: String,
    /// Wall-clock seconds the run had spent when this was written, over all its processes and
    /// stages (a pretraining stage copied from another run excluded). Work a killed process did
    /// after its last checkpoint is not counted: the resumed run redoes it. None in checkpoints
    /// written before it was recorded, and in those of a run resumed from one: unknown, not 0.
    #[serde(default)]
    pub wall_time_s: Option<f64>,
}

/// The sidecar of a `.safetensors` checkpoint.
pub fn sidecar(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Save `varmap` (+ optimiser tensors, already prefixed) to `path` and its sidecar.
pub fn save(path: &Path, varmap: &VarMap, optim: HashMap<String, Tensor>, meta: &Meta) -> Result<(), CheckpointError> {
    let mut tensors = optim;
    {
        let data = varmap.data().lock().map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            message: format!("varmap lock: {e}"),
        })?;
        for (k, v) in data.iter() {
            tensors.insert(k.clone(), v.as_tensor().clone());
        }
    }
    // candle writes the file itself, so the temp + rename is done here; the sidecar goes through
    // the shared atomic writer.
    let tmp = crate::runtime::temp_sibling(path, "");
    let written = candle_core::safetensors::save(&tensors, &tmp)
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CheckpointError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    let json = serde_json::to_string_pretty(meta).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write(&sidecar(path), json.as_bytes())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    crate::report::write_atomic(path, bytes).map_err(|e| match e {
        crate::report::ReportError::Io { source, .. } => CheckpointError::Write {
            path: path.to_path_buf(),
            source,
        },
        other => CheckpointError::Format {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

/// Read the sidecar of `path`.
pub fn load_meta(path: &Path) -> Result<Meta, CheckpointError> {
    let side = sidecar(path);
    if !path.exists() || !side.exists() {
        return Err(CheckpointError::Missing {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&side).map_err(|e| CheckpointError::Format {
        path: side.clone(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
        path: side,
        message: e.to_string(),
    })
}

/// Load the model weights of `path` into `varmap` (every variable must be present with its
/// shape, and the file must hold no other model tensor); returns the optimiser tensors.
pub fn load_weights(path: &Path, varmap: &VarMap, device: &Device) -> Result<HashMap<String, Tensor>, CheckpointError> {
    load_checked(path, varmap, device, |_| false, false)
}

/// Copy the encoder of a finished MAE checkpoint into a classifier's variables. As MAE's
/// main_finetune checks `missing_keys`, the only variables the checkpoint may lack are the new
/// head and `fc_norm` (the decoder it also holds is ignored); anything else (or a shape
/// mismatch) is an error listing them all.
pub fn init_from_pretrain(path: &Path, varmap: &VarMap, device: &Device) -> Result<(), CheckpointError> {
    let new = |name: &str| name.starts_with("head.") || name.starts_with("fc_norm.");
    load_checked(path, varmap, device, new, true).map(|_| ())
}

/// Check every variable of `varmap` against the tensors of `path` — present (unless `may_lack`
/// says so) and of the same shape; no model tensor beyond them unless `extras_ok` — and only
/// then set them all. Returns the tensors not loaded (the optimiser state, or the extras).
fn load_checked(
    path: &Path,
    varmap: &VarMap,
    device: &Device,
    may_lack: fn(&str) -> bool,
    extras_ok: bool,
) -> Result<HashMap<String, Tensor>, CheckpointError> {
    if !path.exists() {
        return Err(CheckpointError::Missing {
            path: path.to_path_buf(),
        });
    }
    let fmt = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let mut tensors = candle_core::safetensors::load(path, device).map_err(|e| fmt(e.to_string()))?;
    let data = varmap.data().lock().map_err(|e| fmt(format!("varmap lock: {e}")))?;
    let mut problems = Vec::new();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in &names {
        match tensors.get(*name) {
            None if may_lack(name) => {}
            None => problems.push(format!("{name}: missing from the checkpoint")),
            Some(t) if t.dims() != data[*name].dims() => problems.push(format!(
                "{name}: checkpoint shape {:?}, model shape {:?}",
                t.dims(),
                data[*name].dims()
            )),
            Some(_) => {}
        }
    }
    if !extras_ok {
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|k| !k.starts_with(OPTIM_PREFIX) && !data.contains_key(*k))
            .collect();
        extra.sort();
        problems.extend(
            extra
                .into_iter()
                .map(|k| format!("{k}: in the checkpoint but not in the model")),
        );
    }
    if !problems.is_empty() {
        return Err(CheckpointError::Mismatch {
            path: path.to_path_buf(),
            problems,
        });
    }
    for name in names {
        if let Some(t) = tensors.remove(name) {
            let var = &data[name];
            let t = t.to_dtype(var.dtype()).map_err(|e| fmt(e.to_string()))?;
            var.set(&t).map_err(|e| fmt(e.to_string()))?;
        }
    }
    Ok(tensors)
}
