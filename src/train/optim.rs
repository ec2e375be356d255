//! AdamW with parameter groups (decoupled weight decay, Loshchilov & Hutter 2019), as
//! `torch.optim.AdamW` computes it, with the groups of MAE fine-tuning
//! (facebookresearch/mae `util/lr_decay.py::param_groups_lrd`): no weight decay on 1-D tensors
//! (biases, norms), `pos_embed` and `cls_token`; layer-wise lr decay by block index.
//! Also gradient accumulation (gradients summed over micro-batches, averaged at the step) and
//! clipping by global norm (torch's `clip_grad_norm_`).
//!
//! The caller owns the schedule: [`AdamW::step`] takes the step's base lr. The update of one
//! tensor is a short chain of candle ops (the accumulation divisor and the clip factor are folded
//! into the same affine ops), so it runs on any device; the optimiser state (m, v, step) is
//! exposed as named tensors for checkpoints.

use crate::config::{PretrainConfig, TrainConfig};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;

/// Hyper-parameters of one optimiser (fine-tuning or pretraining).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Layer-wise lr decay factor (1 = off).
    pub layer_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
}

impl AdamWParams {
    pub fn from_train(t: &TrainConfig) -> Self {
        Self {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
            layer_decay: t.layer_decay,
            grad_clip: t.grad_clip,
        }
    }

    /// MAE pretraining's recipe: betas (0.9, 0.95) (main_pretrain.py), no layer decay, no clipping.
    pub fn from_pretrain(p: &PretrainConfig) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: p.weight_decay,
            layer_decay: 1.0,
            grad_clip: 0.0,
        }
    }
}

/// The group of one parameter: its lr multiplier and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub lr_scale: f64,
    pub weight_decay: f64,
}

/// Names MAE exempts from weight decay besides 1-D tensors (`no_weight_decay_list`), and the
/// register tokens, which timm groups with them (layer 0).
const NO_DECAY: [&str; 4] = ["pos_embed", "cls_token", "dist_token", "reg_token"];

/// MAE's `get_layer_id_for_vit`: 0 for the embeddings, i+1 for `blocks.i`, depth+1 for the rest.
pub fn layer_id(name: &str, depth: usize) -> usize {
    if NO_DECAY.contains(&name) || name.starts_with("patch_embed") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        rest.split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    }
}

/// The group of parameter `name` with `rank` dimensions. `vit_depth` is the encoder depth when
/// the model is a ViT (layer decay applies), `None` otherwise (every scale is 1).
pub fn group_for(name: &str, rank: usize, vit_depth: Option<usize>, hp: &AdamWParams) -> Group {
    let weight_decay = if rank <= 1 || NO_DECAY.contains(&name) {
        0.0
    } else {
        hp.weight_decay
    };
    let lr_scale = match vit_depth {
        Some(depth) => hp.layer_decay.powi((depth + 1 - layer_id(name, depth)) as i32),
        None => 1.0,
    };
    Group { lr_scale, weight_decay }
}

/// Name of the step counter inside a checkpoint.
const STEP_KEY: &str = "optim.step";

struct Param {
    name: String,
    var: Var,
    group: Group,
    m: Tensor,
    v: Tensor,
    /// Gradients summed over the micro-batches of the current step.
    acc: Option<Tensor>,
}

/// What one optimiser step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping (computed only when clipping is on).
    pub grad_norm: Option<f64>,
}

pub struct AdamW {
    params: Vec<Param>,
    hp: AdamWParams,
    /// Optimiser steps taken (torch's `state["step"]`).
    step: usize,
    /// Micro-batches accumulated since the last step.
    micro: usize,
}

impl AdamW {
    /// Every trainable variable of `varmap` (not the batch-norm buffers), in name order
    /// (deterministic).
    pub fn new(varmap: &VarMap, hp: AdamWParams, vit_depth: Option<usize>) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|e| candle_core::Error::Msg(format!("varmap lock: {e}")))?;
        let mut named: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        drop(data);
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_vars(named, hp, vit_depth)
    }

    /// As [`AdamW::new`] from explicit (name, var) pairs.
    pub fn from_vars(named: Vec<(String, Var)>, hp: AdamWParams, vit_depth: Option<usize>) -> Result<Self> {
        let params = named
            .into_iter()
            .filter(|(name, var)| var.dtype().is_float() && !crate::models::conv::is_buffer(name))
            .map(|(name, var)| {
                let group = group_for(&name, var.rank(), vit_depth, &hp);
                Ok(Param {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    name,
                    var,
                    group,
                    acc: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            hp,
            step: 0,
            micro: 0,
        })
    }

    /// (name, group) of every parameter, in order.
    pub fn groups(&self) -> Vec<(String, Group)> {
        self.params.iter().map(|p| (p.name.clone(), p.group)).collect()
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Add one micro-batch's gradients. Parameters without a gradient are left alone.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        for p in &mut self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                // candle does not detach the gradients of variables: they still reference the
                // step's activations. Detach, or the optimiser state keeps every step's graph alive.
                let g = g.detach();
                p.acc = Some(match p.acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
        self.micro += 1;
        Ok(())
    }

    /// One AdamW step at base lr `lr` on the averaged accumulated gradients (each group's lr is
    /// `lr × lr_scale`). Parameters that got no gradient are skipped, as torch does.
    pub fn step(&mut self, lr: f64) -> Result<StepStats> {
        if self.micro == 0 {
            candle_core::bail!("AdamW::step called without accumulated gradients");
        }
        let inv_micro = 1.0 / self.micro as f64;
        // Global norm of the averaged gradient, one host sync for all tensors.
        let (clip, grad_norm) = if self.hp.grad_clip > 0.0 {
            let mut sq: Option<Tensor> = None;
            for a in self.params.iter().filter_map(|p| p.acc.as_ref()) {
                let s = a.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?;
                sq = Some(match sq {
                    Some(t) => (t + s)?,
                    None => s,
                });
            }
            let norm = match sq {
                Some(t) => t.to_scalar::<f64>()? * inv_micro * inv_micro,
                None => 0.0,
            }
            .sqrt();
            // torch: clip_coef = max_norm / (total_norm + 1e-6), clamped to 1.
            ((self.hp.grad_clip / (norm + 1e-6)).min(1.0), Some(norm))
        } else {
            (1.0, None)
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.hp.beta1, self.hp.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let gscale = clip * inv_micro;
        for p in &mut self.params {
            let Some(g) = p.acc.take() else { continue };
            let lr_p = lr * p.group.lr_scale;
            // m ← β1 m + (1−β1) g ; v ← β2 v + (1−β2) g², with g = gscale · Σ micro-gradients.
            p.m = (p.m.affine(b1, 0.0)? + g.affine((1.0 - b1) * gscale, 0.0)?)?.detach();
            p.v = (p.v.affine(b2, 0.0)? + g.sqr()?.affine((1.0 - b2) * gscale * gscale, 0.0)?)?.detach();
            // denom = √v / √bc2 + ε ; θ ← θ(1 − lr·wd) − (lr / bc1) · m / denom.
            let denom = p.v.sqrt()?.affine(1.0 / bc2.sqrt(), self.hp.eps)?;
            let upd = (&p.m / denom)?.affine(lr_p / bc1, 0.0)?;
            let theta = p.var.as_tensor().affine(1.0 - lr_p * p.group.weight_decay, 0.0)?;
            p.var.set(&(theta - upd)?)?;
        }
        self.micro = 0;
        Ok(StepStats { grad_norm })
    }

    /// The optimiser state as named tensors: `optim.m.<name>`, `optim.v.<name>`, and the step
    /// count as the scalar `optim.step` (so a tensor file can be matched to its sidecar).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(2 * self.params.len() + 1);
        out.insert(
            STEP_KEY.to_string(),
            Tensor::new(self.step as f64, &candle_core::Device::Cpu)?,
        );
        for p in &self.params {
            out.insert(format!("optim.m.{}", p.name), p.m.clone());
            out.insert(format!("optim.v.{}", p.name), p.v.clone());
        }
        Ok(out)
    }

    /// Restore m, v (from [`AdamW::state_tensors`]'s names) and the step count, which must equal
    /// the file's `optim.step` (a torn checkpoint is refused). Every parameter must be present
    /// with its shape; the error lists what is missing or mis-shaped.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut problems = Vec::new();
        match tensors
            .get(STEP_KEY)
            .map(|t| t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>())
            .transpose()?
        {
            Some(s) if s == step as f64 => {}
            Some(s) => problems.push(format!(
                "{STEP_KEY}: the tensors are from step {s}, the sidecar says {step}"
            )),
            None => problems.push(format!("{STEP_KEY}: missing")),
        }
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut get = |kind: &str| -> Option<Tensor> {
                let key = format!("optim.{kind}.{}", p.name);
                match tensors.get(&key) {
                    None => {
                        problems.push(format!("{key}: missing"));
                        None
                    }
                    Some(t) if t.dims() != p.var.dims() => {
                        problems.push(format!("{key}: shape {:?}, expected {:?}", t.dims(), p.var.dims()));
                        None
                    }
                    Some(t) => Some(t.clone()),
                }
            };
            let (m, v) = (get("m"), get("v"));
            loaded.push((m, v));
        }
        if !problems.is_empty() {
            candle_core::bail!("optimiser state does not match the model:\n  {}", problems.join("\n  "));
        }
        for (p, (m, v)) in self.params.iter_mut().zip(loaded) {
            if let (Some(m), Some(v)) = (m, v) {
                p.m = m.to_device(p.var.device())?.to_dtype(p.var.dtype())?;
                p.v = v.to_device(p.var.device())?.to_dtype(p.var.dtype())?;
            }
            p.acc = None;
        }
        self.step = step;
        self.micro = 0;
        Ok(())
    }
}
