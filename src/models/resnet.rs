//! timm's `ResNet` (He et al. 2016, the v1.5 variant timm and torchvision build: a bottleneck's
//! stride sits in its 3×3 conv), with timm's parameter names so that timm state dicts load as
//! they are: `conv1` / `bn1` (7×7 stride-2 stem), a 3×3 stride-2 max pool (padding 1),
//! `layer{s}.{b}.conv{1,2[,3]}` / `bn…` / `downsample.{0,1}` (1×1 stride-s conv + batch norm where
//! the shape changes), global average pool, `fc`.
//!
//! Every conv, norm, activation, pool and residual add is a step of the layerwise decomposition.
//! The max pool's tangent is the one of the window's arg-max element (first in row-major order on
//! ties); ReLU's tangent at 0 is 0.

use super::conv::{pooled_net_model, ConvBn, Flow, GlobalAvgPool, Layer, Linear, MaxPool2d, Relu};
use super::layers::DropPath;
use super::Rng;
use crate::config::{ResnetBlock, ResnetConfig};
use crate::jvp::{Jvp, Repr, StepKind, Tape};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Width of timm's plain 7×7 stem (its `stem_width` argument sizes only the deep stems).
const STEM_WIDTH: usize = 64;

/// One residual block: `act(bn_last(…conv…(x)) + shortcut(x))`, basic (two 3×3 convs) or
/// bottleneck (1×1 → 3×3 → 1×1, 4× wider out).
#[derive(Clone, Debug)]
struct Block {
    name: String,
    /// conv + bn pairs in order; ReLU follows every one but the last.
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
    drop_path: DropPath,
}

impl Block {
    fn load(
        kind: ResnetBlock,
        in_c: usize,
        planes: usize,
        stride: usize,
        drop_path: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let out_c = planes * expansion(kind);
        // timm's zero_init_last: the last norm starts at 0, so the block starts as its shortcut.
        let convs = match kind {
            ResnetBlock::Basic => vec![
                ConvBn::load(in_c, planes, 3, stride, &vb, "conv1", "bn1", 1.0)?,
                ConvBn::load(planes, planes, 3, 1, &vb, "conv2", "bn2", 0.0)?,
            ],
            ResnetBlock::Bottleneck => vec![
                ConvBn::load(in_c, planes, 1, 1, &vb, "conv1", "bn1", 1.0)?,
                ConvBn::load(planes, planes, 3, stride, &vb, "conv2", "bn2", 1.0)?,
                ConvBn::load(planes, out_c, 1, 1, &vb, "conv3", "bn3", 0.0)?,
            ],
        };
        let downsample = if stride != 1 || in_c != out_c {
            Some(ConvBn::load(
                in_c,
                out_c,
                1,
                stride,
                &vb.pp("downsample"),
                "0",
                "1",
                1.0,
            )?)
        } else {
            None
        };
        Ok(Self {
            name: vb.prefix(),
            convs,
            downsample,
            drop_path: DropPath { rate: drop_path },
        })
    }

    fn run(&self, f: &Flow, rng: Option<&mut Rng>, tape: &mut Tape) -> Result<Flow> {
        let train = rng.is_some();
        let n = self.convs.len();
        let mut h = f.clone();
        for (i, cb) in self.convs.iter().enumerate() {
            h = cb.run(&h, train, tape)?;
            if i + 1 < n {
                h = relu(&h, &format!("{}.act{}", self.name, i + 1), train, tape)?;
            }
        }
        if !self.drop_path.is_identity(train) {
            h = Flow::new(self.drop_path.forward(&h.x, rng)?, h.dx);
        }
        let s = match &self.downsample {
            Some(d) => d.run(f, train, tape)?,
            None => f.clone(),
        };
        let y = h.add(&s, &format!("{}.add", self.name), tape)?;
        relu(&y, &format!("{}.act{}", self.name, n), train, tape)
    }
}

fn expansion(kind: ResnetBlock) -> usize {
    match kind {
        ResnetBlock::Basic => 1,
        ResnetBlock::Bottleneck => 4,
    }
}

fn relu(f: &Flow, name: &str, train: bool, tape: &mut Tape) -> Result<Flow> {
    f.apply(&Relu, name, StepKind::Activation, Repr::Image, train, tape)
}

/// A timm ResNet classifier: images `(B, C, H, W)` → logits `(B, K)`.
#[derive(Clone, Debug)]
pub struct Resnet {
    stem: ConvBn,
    pool: MaxPool2d,
    /// `stages[s][b]` is timm's `layer{s+1}.{b}`.
    stages: Vec<Vec<Block>>,
    fc: Linear,
}

impl Resnet {
    pub fn new(cfg: &ResnetConfig, in_chans: usize, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        if cfg.layers.is_empty() || cfg.layers.len() != cfg.channels.len() {
            candle_core::bail!("model.resnet needs as many channels as layers (one width per stage)");
        }
        let stem = ConvBn::load(in_chans, STEM_WIDTH, 7, 2, &vb, "conv1", "bn1", 1.0)?;
        let total: usize = cfg.layers.iter().sum();
        let mut in_c = STEM_WIDTH;
        let mut index = 0;
        let mut stages = Vec::with_capacity(cfg.layers.len());
        for (s, (&n, &planes)) in cfg.layers.iter().zip(&cfg.channels).enumerate() {
            let vs = vb.pp(format!("layer{}", s + 1));
            let mut blocks = Vec::with_capacity(n);
            for b in 0..n {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                // timm: drop_path_rate · block index / (blocks − 1), over the whole network.
                let rate = cfg.drop_path_rate * index as f64 / (total.max(2) - 1) as f64;
                blocks.push(Block::load(cfg.block, in_c, planes, stride, rate, vs.pp(b))?);
                in_c = planes * expansion(cfg.block);
                index += 1;
            }
            stages.push(blocks);
        }
        Ok(Self {
            stem,
            pool: MaxPool2d {
                k: 3,
                stride: 2,
                pad: 1,
            },
            stages,
            fc: Linear::load(in_c, num_classes, vb.pp("fc"))?,
        })
    }

    /// Everything before `fc`: the globally pooled features.
    fn body(&self, x: &Tensor, dx: Option<&Tensor>, mut rng: Option<&mut Rng>, tape: &mut Tape) -> Result<Flow> {
        let train = rng.is_some();
        let f = self.stem.run(&Flow::new(x.clone(), dx.cloned()), train, tape)?;
        let f = relu(&f, "act1", train, tape)?;
        let mut f = f.apply(&self.pool, "maxpool", StepKind::Pool, Repr::Image, train, tape)?;
        for block in self.stages.iter().flatten() {
            f = block.run(&f, rng.as_deref_mut(), tape)?;
        }
        f.apply(
            &GlobalAvgPool,
            "global_pool",
            StepKind::Pool,
            Repr::Invariant,
            train,
            tape,
        )
    }
}

pooled_net_model!(Resnet, "fc");
