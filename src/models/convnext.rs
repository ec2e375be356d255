//! timm's `ConvNeXt` (Liu et al. 2022) with timm's parameter names, so timm state dicts load as
//! they are: `stem.{0,1}` (patchify conv + LayerNorm), `stages.{s}.downsample.{0,1}` (LayerNorm +
//! 2×2 stride-2 conv, stages after the first), `stages.{s}.blocks.{b}.{conv_dw, norm, mlp.fc1,
//! mlp.fc2, gamma}`, `head.{norm, fc}` after global average pooling.
//!
//! Feature maps stay `(B, C, H, W)` between blocks; inside a block the LayerNorm and MLP run
//! channels-last, `(B, H, W, C)`, on the same row kernels as the ViT's. Every op is a step of the
//! layerwise decomposition, recorded in the image layout the tape reads.

use super::conv::{
    join, pooled_net_model, Conv2d, ConvSpec, DepthwiseConv2d, Flow, GlobalAvgPool, Layer, Linear, PadMode,
};
use super::layers::{layer_norm, mlp, DropPath, LayerNorm, Mlp, ResidualBranch};
use super::Rng;
use crate::config::ConvnextConfig;
use crate::jvp::{Jvp, Repr, StepKind, Tape};
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// `(B, C, H, W)` ↔ `(B, H, W, C)` for a primal; tangents carry one more leading axis.
fn to_last(x: &Tensor) -> Result<Tensor> {
    let r = x.rank();
    let mut order: Vec<usize> = (0..r - 3).collect();
    order.extend_from_slice(&[r - 2, r - 1, r - 3]);
    x.permute(order)?.contiguous()
}

fn to_first(x: &Tensor) -> Result<Tensor> {
    let r = x.rank();
    let mut order: Vec<usize> = (0..r - 3).collect();
    order.extend_from_slice(&[r - 1, r - 3, r - 2]);
    x.permute(order)?.contiguous()
}

/// Record a step whose output is channels-last: the tape reads images as `(B, C, H, W)`.
fn step_last(tape: &mut Tape, name: &str, kind: StepKind, y: &Tensor, dy: Tensor) -> Result<Tensor> {
    if !tape.is_recording() {
        return Ok(dy);
    }
    to_last(&tape.step(name, kind, Repr::Image, &to_first(y)?, to_first(&dy)?)?)
}

/// LayerNorm over the channels of `(B, C, H, W)` (timm's `LayerNorm2d`).
#[derive(Clone, Debug)]
struct LayerNorm2d(LayerNorm);

impl Layer for LayerNorm2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        to_first(&self.0.forward(&to_last(x)?)?)
    }
}

impl Jvp for LayerNorm2d {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (y, dy) = self.0.jvp(&to_last(x)?, &to_last(dx)?, tape)?;
        Ok((to_first(&y)?, to_first(&dy)?))
    }
}

/// `x + drop_path(gamma · mlp(norm(conv_dw(x))))`.
#[derive(Clone, Debug)]
struct Block {
    name: String,
    conv_dw: DepthwiseConv2d,
    norm: LayerNorm,
    mlp: Mlp,
    /// Layer scale `(C)`; absent when `ls_init_value` is 0.
    gamma: Option<Tensor>,
    drop_path: DropPath,
}

impl Block {
    fn load(dim: usize, cfg: &ConvnextConfig, drop_path: f64, vb: VarBuilder) -> Result<Self> {
        let gamma = (cfg.ls_init_value > 0.0)
            .then(|| vb.get_with_hints(dim, "gamma", Init::Const(cfg.ls_init_value)))
            .transpose()?;
        Ok(Self {
            name: vb.prefix(),
            conv_dw: DepthwiseConv2d::load(dim, cfg.kernel_sizes, vb.pp("conv_dw"))?,
            norm: layer_norm(dim, cfg.norm_eps, vb.pp("norm"))?,
            mlp: mlp(dim, 4 * dim, vb.pp("mlp"))?,
            gamma,
            drop_path: DropPath { rate: drop_path },
        })
    }

    fn run(&self, f: &Flow, rng: Option<&mut Rng>, tape: &mut Tape) -> Result<Flow> {
        let name = |s: &str| join(&self.name, s);
        let train = rng.is_some();
        let h = f.apply(
            &self.conv_dw,
            &name("conv_dw"),
            StepKind::Conv,
            Repr::Image,
            train,
            tape,
        )?;
        let x = to_last(&h.x)?;
        let branch = match &h.dx {
            None => {
                let m = self.mlp.forward(&self.norm.forward(&x)?)?;
                let m = match &self.gamma {
                    Some(g) => m.broadcast_mul(g)?,
                    None => m,
                };
                Flow::new(to_first(&self.drop_path.forward(&m, rng)?)?, None)
            }
            Some(dh) => {
                let dx = to_last(dh)?;
                let (y, dy) = self.norm.jvp(&x, &dx, tape)?;
                let dy = step_last(tape, &name("norm"), StepKind::Norm, &y, dy)?;
                let (y, dy) = self.mlp.fc1.jvp(&y, &dy, tape)?;
                let dy = step_last(tape, &name("mlp.fc1"), StepKind::Linear, &y, dy)?;
                let (y, dy) = self.mlp.act.jvp(&y, &dy, tape)?;
                let dy = step_last(tape, &name("mlp.act"), StepKind::Activation, &y, dy)?;
                let (mut y, mut dy) = self.mlp.fc2.jvp(&y, &dy, tape)?;
                dy = step_last(tape, &name("mlp.fc2"), StepKind::Linear, &y, dy)?;
                if let Some(g) = &self.gamma {
                    y = y.broadcast_mul(g)?;
                    dy = step_last(tape, &name("gamma"), StepKind::Linear, &y, dy.broadcast_mul(g)?)?;
                }
                Flow::new(to_first(&y)?, Some(to_first(&dy)?))
            }
        };
        branch.add(f, &name("add"), tape)
    }
}

/// A stage: optional downsampling (LayerNorm2d + 2×2 stride-2 conv), then blocks.
#[derive(Clone, Debug)]
struct Stage {
    name: String,
    downsample: Option<(LayerNorm2d, Conv2d)>,
    blocks: Vec<Block>,
}

/// A timm ConvNeXt classifier: images `(B, C, H, W)` → logits `(B, K)`.
#[derive(Clone, Debug)]
pub struct Convnext {
    stem: (Conv2d, LayerNorm2d),
    stages: Vec<Stage>,
    head_norm: LayerNorm,
    fc: Linear,
}

impl Convnext {
    pub fn new(cfg: &ConvnextConfig, in_chans: usize, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        if cfg.depths.is_empty() || cfg.depths.len() != cfg.dims.len() {
            candle_core::bail!("model.convnext needs as many dims as depths (one width per stage)");
        }
        let patch = ConvSpec {
            stride: cfg.patch_size,
            padding: 0,
            pad_mode: PadMode::Zeros,
        };
        let vs = vb.pp("stem");
        let stem = (
            Conv2d::load(in_chans, cfg.dims[0], cfg.patch_size, patch, true, vs.pp("0"))?,
            LayerNorm2d(layer_norm(cfg.dims[0], cfg.norm_eps, vs.pp("1"))?),
        );
        let total: usize = cfg.depths.iter().sum();
        let mut index = 0;
        let mut in_c = cfg.dims[0];
        let mut stages = Vec::with_capacity(cfg.depths.len());
        for (s, (&depth, &dim)) in cfg.depths.iter().zip(&cfg.dims).enumerate() {
            let vs = vb.pp("stages").pp(s);
            let stride = cfg.stage_stride(s);
            // timm: LayerNorm + a stride-sized conv where the width or the grid changes.
            let downsample = if in_c != dim || stride > 1 {
                let vd = vs.pp("downsample");
                let k = if stride > 1 { 2 } else { 1 };
                let spec = ConvSpec {
                    stride,
                    padding: 0,
                    pad_mode: PadMode::Zeros,
                };
                Some((
                    LayerNorm2d(layer_norm(in_c, cfg.norm_eps, vd.pp("0"))?),
                    Conv2d::load(in_c, dim, k, spec, true, vd.pp("1"))?,
                ))
            } else {
                None
            };
            let mut blocks = Vec::with_capacity(depth);
            for b in 0..depth {
                let rate = cfg.drop_path_rate * index as f64 / (total.max(2) - 1) as f64;
                blocks.push(Block::load(dim, cfg, rate, vs.pp("blocks").pp(b))?);
                index += 1;
            }
            stages.push(Stage {
                name: vs.prefix(),
                downsample,
                blocks,
            });
            in_c = dim;
        }
        let vh = vb.pp("head");
        Ok(Self {
            stem,
            stages,
            head_norm: layer_norm(in_c, cfg.norm_eps, vh.pp("norm"))?,
            fc: Linear::load(in_c, num_classes, vh.pp("fc"))?,
        })
    }

    /// Everything before `head.fc`: the pooled, normalised features.
    fn body(&self, x: &Tensor, dx: Option<&Tensor>, mut rng: Option<&mut Rng>, tape: &mut Tape) -> Result<Flow> {
        let train = rng.is_some();
        let f = Flow::new(x.clone(), dx.cloned());
        let f = f.apply(&self.stem.0, "stem.0", StepKind::PatchEmbed, Repr::Image, train, tape)?;
        let mut f = f.apply(&self.stem.1, "stem.1", StepKind::Norm, Repr::Image, train, tape)?;
        for stage in &self.stages {
            if let Some((norm, conv)) = &stage.downsample {
                let p = join(&stage.name, "downsample");
                f = f.apply(norm, &join(&p, "0"), StepKind::Norm, Repr::Image, train, tape)?;
                f = f.apply(conv, &join(&p, "1"), StepKind::Conv, Repr::Image, train, tape)?;
            }
            for block in &stage.blocks {
                f = block.run(&f, rng.as_deref_mut(), tape)?;
            }
        }
        let f = f.apply(
            &GlobalAvgPool,
            "head.global_pool",
            StepKind::Pool,
            Repr::Invariant,
            train,
            tape,
        )?;
        Ok(match &f.dx {
            None => Flow::new(self.head_norm.forward(&f.x)?, None),
            Some(dx) => {
                let (y, dy) = self.head_norm.jvp(&f.x, dx, tape)?;
                let dy = tape.step("head.norm", StepKind::Norm, Repr::Invariant, &y, dy)?;
                Flow::new(y, Some(dy))
            }
        })
    }
}

pooled_net_model!(Convnext, "head.fc");
