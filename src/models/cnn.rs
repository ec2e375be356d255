//! The CNN baseline of Table 1: a small ResNet (He et al. 2016, basic blocks, batch norm) for
//! 28×28 digits. Stem 3×3 conv at full resolution; stages of `blocks` residual blocks with widths
//! `cfg.widths`, every stage starting with a stride-2 conv (and a 1×1 stride-2 projection
//! shortcut), so 28 → 14 → 7 → 4 → 2 with the default four stages; global average pool; linear
//! head. The first stage already downsamples because candle's CPU conv is slowest with few
//! channels on a large grid: a 16→16 3×3 conv on a 128×16×28×28 batch ran at ~1.6 GFLOP/s with a
//! backward ~5× its forward (measured on the 2-core machine, under load).

use super::conv::{head_readout, ConvBn, Flow, GlobalAvgPool, Layer, Linear, Relu};
use super::{Model, Readout, ReadoutJvp, Rng};
use crate::config::CnnConfig;
use crate::jvp::{Jvp, Repr, StepKind, Tape};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// A basic residual block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)).
#[derive(Clone, Debug)]
struct BasicBlock {
    a: ConvBn,
    b: ConvBn,
    /// 1×1 projection when the shape changes.
    shortcut: Option<ConvBn>,
}

impl BasicBlock {
    fn run(&self, f: &Flow, p: &str, train: bool, tape: &mut Tape) -> Result<Flow> {
        let h = self.a.run(f, train, tape)?;
        let h = h.apply(
            &Relu,
            &format!("{p}.relu1"),
            StepKind::Activation,
            Repr::Image,
            train,
            tape,
        )?;
        let h = self.b.run(&h, train, tape)?;
        let s = match &self.shortcut {
            Some(sc) => sc.run(f, train, tape)?,
            None => f.clone(),
        };
        h.add(&s, &format!("{p}.add"), tape)?.apply(
            &Relu,
            &format!("{p}.relu2"),
            StepKind::Activation,
            Repr::Image,
            train,
            tape,
        )
    }
}

/// The ResNet-style classifier: images `(B, C, H, W)` → logits `(B, K)`.
#[derive(Clone, Debug)]
pub struct Cnn {
    stem: ConvBn,
    /// `stages[s][b]` is named `stage{s+1}.block{b}`.
    stages: Vec<Vec<BasicBlock>>,
    head: Linear,
}

impl Cnn {
    /// Parameters: `stem.{conv,bn}`, `stage{s}.block{b}.{conv1,bn1,conv2,bn2}`,
    /// `stage{s}.block0.shortcut.{conv,bn}`, `head`.
    pub fn new(cfg: &CnnConfig, in_chans: usize, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        if cfg.widths.is_empty() || cfg.blocks == 0 {
            candle_core::bail!("model.cnn needs at least one stage width and one block per stage");
        }
        let stem = ConvBn::load(in_chans, cfg.widths[0], 3, 1, &vb.pp("stem"), "conv", "bn", 1.0)?;
        let mut in_c = cfg.widths[0];
        let mut stages = Vec::with_capacity(cfg.widths.len());
        for (s, &w) in cfg.widths.iter().enumerate() {
            let vs = vb.pp(format!("stage{}", s + 1));
            let mut blocks = Vec::with_capacity(cfg.blocks);
            for b in 0..cfg.blocks {
                let vb = vs.pp(format!("block{b}"));
                let stride = if b == 0 { 2 } else { 1 };
                let shortcut = if stride != 1 || in_c != w {
                    Some(ConvBn::load(in_c, w, 1, stride, &vb.pp("shortcut"), "conv", "bn", 1.0)?)
                } else {
                    None
                };
                blocks.push(BasicBlock {
                    a: ConvBn::load(in_c, w, 3, stride, &vb, "conv1", "bn1", 1.0)?,
                    b: ConvBn::load(w, w, 3, 1, &vb, "conv2", "bn2", 1.0)?,
                    shortcut,
                });
                in_c = w;
            }
            stages.push(blocks);
        }
        let head = Linear::load(in_c, num_classes, vb.pp("head"))?;
        Ok(Self { stem, stages, head })
    }

    /// Everything before the head: the globally pooled features.
    fn body(&self, x: &Tensor, dx: Option<&Tensor>, train: bool, tape: &mut Tape) -> Result<Flow> {
        let f = Flow::new(x.clone(), dx.cloned());
        let f = self.stem.run(&f, train, tape)?;
        let mut f = f.apply(&Relu, "stem.relu", StepKind::Activation, Repr::Image, train, tape)?;
        for (s, blocks) in self.stages.iter().enumerate() {
            for (b, block) in blocks.iter().enumerate() {
                f = block.run(&f, &format!("stage{}.block{b}", s + 1), train, tape)?;
            }
        }
        let f = f.apply(&GlobalAvgPool, "pool", StepKind::Pool, Repr::Invariant, train, tape)?;
        Ok(f)
    }
}

impl Model for Cnn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.head
            .forward_t(&self.body(x, None, false, &mut Tape::off())?.x, false)
    }

    /// No stochastic layers: `rng` is unused (batch statistics are the training-mode difference).
    fn forward_train(&self, x: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        self.head
            .forward_t(&self.body(x, None, true, &mut Tape::off())?.x, true)
    }

    fn jvp_at(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape, at: Readout) -> Result<ReadoutJvp> {
        head_readout(self.body(x, Some(dx), false, tape)?, &self.head, at, "head", tape)
    }
}

impl Jvp for Cnn {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let r = self.jvp_at(x, dx, tape, Readout::Logits)?;
        Ok((r.y, r.dy))
    }
}
