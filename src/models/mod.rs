//! The model zoo: Table 1's models (our ViT and its MAE pretraining wrapper, a ResNet-style CNN,
//! a C_N group-equivariant CNN) and timm's ResNet and ConvNeXt. Models know nothing of the trainer; every model implements the
//! forward + [`Jvp`] contract that the LEE code needs.

pub mod averaged;
pub mod cnn;
pub mod conv;
pub mod convnext;
pub mod export;
pub mod gcnn;
pub mod init;
pub mod layers;
pub mod mae;
pub mod resnet;
pub mod vit;
pub mod weights;

use crate::config::{Config, InitWeights, ModelKind};
use crate::jvp::{Jvp, Tape};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

/// The seeded RNG threaded through everything random in training (dropout, drop path, masking).
pub type Rng = rand_chacha::ChaCha8Rng;

/// Where a JVP through a classifier stops ([`Model::jvp_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readout {
    Logits,
    /// The pooled representation the head reads, `(B, D)`.
    Features,
    /// The ViT's patch tokens after the last block (before the final norm), `(B, N, D)`.
    Tokens,
}

/// A JVP stopped at a readout: the readout `y` with its tangent `dy: (T, …)`, and the logits
/// (the rest of the forward pass, without tangents) for the accuracy measured beside it.
pub struct ReadoutJvp {
    pub logits: Tensor,
    pub y: Tensor,
    pub dy: Tensor,
}

/// A classifier: images `(B, C, H, W)` → logits `(B, K)`.
pub trait Model: Jvp {
    /// Eval-mode logits (no dropout / drop path, batch norm with running statistics).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Training-mode logits (drop path, batch statistics; running statistics are updated).
    fn forward_train(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor>;
    /// The eval-mode JVP up to `at`. `Readout::Logits` is [`Jvp::jvp`]; a model that exposes no
    /// representation (the default) refuses the others.
    fn jvp_at(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape, at: Readout) -> Result<ReadoutJvp> {
        if at != Readout::Logits {
            candle_core::bail!("this model exposes only its logits, not {at:?}");
        }
        let (logits, dy) = self.jvp(x, dx, tape)?;
        Ok(ReadoutJvp {
            y: logits.clone(),
            logits,
            dy,
        })
    }
    /// Gradient checkpointing (timm's `set_grad_checkpointing`): each transformer block keeps only
    /// its input and is recomputed in the backward, which must then be
    /// [`kernels::checkpoint::backward`](crate::kernels::checkpoint::backward). Models without
    /// blocks refuse it.
    fn set_grad_checkpointing(&mut self, on: bool) -> Result<()> {
        if on {
            candle_core::bail!("this model has no transformer blocks to checkpoint");
        }
        Ok(())
    }
    /// N when the hidden features are C_N group feature maps (`Repr::Group`), else none.
    fn group_order(&self) -> Option<usize> {
        None
    }
}

/// Build the classifier the config describes on the variables of `varmap` (tensors already in
/// the map, e.g. pretrained weights, are used; missing ones are initialised from `cfg.seed`).
pub fn build_with(cfg: &Config, varmap: &VarMap, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
    build_from(cfg, init::SeededVarMap::var_builder(varmap, cfg.seed, dtype, device))
}

/// The same classifier on detached views of `varmap`'s variables, for inference (evaluation, LEE,
/// metrics). The views share the variables' storage, so they see every optimiser update, but no
/// op on them joins an autograd graph: a forward or JVP frees each activation once the next layer
/// has used it, instead of keeping all of them alive until the output is dropped (ViT-B/16's LEE at
/// 224 px on 32 images over 5 transforms ran an 80 GB GPU out of memory that way).
pub fn frozen(cfg: &Config, varmap: &VarMap, device: &Device) -> Result<Box<dyn Model>> {
    build_from(
        cfg,
        views_of(varmap, DType::F32, device, |var| Ok(var.as_tensor().detach()))?,
    )
}

/// The same classifier computing in `dtype` (mixed precision) on casts of `varmap`'s variables
/// that stay in the graph: the gradients flow back through the casts to the f32 variables. Built
/// per training step, so the casts follow every optimiser update.
pub fn build_cast(cfg: &Config, varmap: &VarMap, dtype: DType, device: &Device) -> Result<Box<dyn Model>> {
    build_from(cfg, cast_var_builder(varmap, dtype, device)?)
}

/// A VarBuilder over differentiable `dtype` casts of `varmap`'s variables (see [`build_cast`]).
pub fn cast_var_builder(varmap: &VarMap, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    views_of(varmap, dtype, device, |var| var.as_tensor().to_dtype(dtype))
}

/// A VarBuilder of `dtype` over `view(var)` of every variable of `varmap`.
fn views_of(
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
    view: impl Fn(&Var) -> Result<Tensor>,
) -> Result<VarBuilder<'static>> {
    let views = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("the variable map's lock is poisoned".into()))?
        .iter()
        .map(|(name, var)| Ok((name.clone(), view(var)?)))
        .collect::<Result<std::collections::HashMap<String, Tensor>>>()?;
    Ok(VarBuilder::from_tensors(views, dtype, device))
}

fn build_from(cfg: &Config, vb: VarBuilder) -> Result<Box<dyn Model>> {
    let (m, d) = (&cfg.model, &cfg.data);
    let model: Box<dyn Model> = match m.kind {
        ModelKind::Vit => Box::new(vit::Vit::new(&m.vit, d.image_size, d.channels, m.num_classes, vb)?),
        ModelKind::Cnn => Box::new(cnn::Cnn::new(&m.cnn, d.channels, m.num_classes, vb)?),
        ModelKind::Gcnn => Box::new(gcnn::Gcnn::new(&m.gcnn, d.channels, m.num_classes, vb)?),
        ModelKind::Resnet => Box::new(resnet::Resnet::new(&m.resnet, d.channels, m.num_classes, vb)?),
        ModelKind::Convnext => Box::new(convnext::Convnext::new(&m.convnext, d.channels, m.num_classes, vb)?),
    };
    Ok(match m.average_rotations {
        0 | 1 => model,
        n => Box::new(averaged::RotationAveraged::new(model, n, d.blank())),
    })
}

/// The name and shape of every variable of the model `cfg` describes, read off a dry construction
/// (so the layout a checkpoint is checked against is the model's own, by construction).
pub fn parameter_shapes(cfg: &Config) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
    let vm = VarMap::new();
    build_from(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let data = vm
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("the variable map's lock is poisoned".into()))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect())
}

/// The model as the config initialises it (f32), with its variables: pretrained ViT weights from
/// the Hub or a file when `init.weights` says so (checked and adapted by [`weights`]), the rest
/// initialised from `cfg.seed`. `init.weights = "pretrain"` is resolved by the trainer.
pub fn build_model(cfg: &Config, device: &Device) -> Result<(VarMap, Box<dyn Model>)> {
    let varmap = VarMap::new();
    if matches!(cfg.init.weights, InitWeights::Hub | InitWeights::File) {
        let (m, d) = (&cfg.model, &cfg.data);
        let pre = match m.kind {
            ModelKind::Vit => weights::load_pretrained(&cfg.init, &m.vit, d.image_size, d.channels, m.num_classes),
            ModelKind::Resnet | ModelKind::Convnext => weights::load_timm(&cfg.init, &parameter_shapes(cfg)?),
            ModelKind::Cnn | ModelKind::Gcnn => candle_core::bail!(
                "init.weights = \"{}\" loads ViT, ResNet and ConvNeXt checkpoints; model.kind is \"{}\" (use init.weights = \"random\")",
                cfg.init.weights,
                m.kind
            ),
        }
        .map_err(candle_core::Error::wrap)?;
        for note in &pre.notes {
            eprintln!("weights: {note}");
        }
        pre.insert_into(&varmap, device).map_err(candle_core::Error::wrap)?;
    }
    let model = build_with(cfg, &varmap, DType::F32, device)?;
    Ok((varmap, model))
}
