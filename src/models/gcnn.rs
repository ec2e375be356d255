//! A rotation-equivariant CNN over the cyclic group C_N (Cohen & Welling 2016, "Group Equivariant
//! Convolutional Networks"; N = 8/16 with interpolated, disk-masked filters as in Weiler & Cesa's
//! escnn): the "architectural equivariance" side of the paper's Table 1.
//!
//! Feature maps are `(B, C, N, H, W)`: C fields of N orientation channels. The lifting conv's
//! filter for orientation r is the base filter rotated by 2πr/N; a group conv's filter for output
//! orientation r is the base filter rotated by 2πr/N and rolled by r along its input-orientation
//! axis, so rotating the input by 2πg/N rotates every map and rolls the orientation axis by g.
//! Rotations by multiples of 90° are exact index permutations (rot90); the remainder (N = 8/16) is
//! a bilinear rotation of the filter with `crate::transforms::apply`, inside a disk mask. Filters
//! are rebuilt from the base weights by differentiable ops on every call, so training updates the
//! base filters. Batch norm keeps one statistic (and one affine bias) per field; convs have no
//! bias of their own (the BN shift is the field bias; a bias before BN gets no gradient).
//!
//! Exactness on the grid: "same" zero-padded stride-1 convs and 2×2 average pooling of an even
//! grid commute with rot90 about the image centre, so the net pools 2×2 after each layer but the
//! last only while the grid is even (28 → 14 → 7) and never uses strided convs. Then a group
//! max-pool over orientations and a global spatial mean give C4-invariant logits exactly.

use super::conv::{
    conv2d_op, head_readout, max_along, param, AvgPool2d, BatchNorm, ConvSpec, Flow, GlobalAvgPool, Layer, Linear,
    ParamInit, Relu,
};
use super::{Model, Readout, ReadoutJvp, Rng};
use crate::config::GcnnConfig;
use crate::jvp::{merge_tangent, split_tangent, Jvp, Repr, StepKind, Tape};
use crate::transforms::{apply, Padding, Transform};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Rotate the last two axes of a square filter by 90° (the warp's sense of `rotate(π/2)`):
/// `out[i][j] = w[k−1−j][i]`.
pub fn rot90(w: &Tensor) -> Result<Tensor> {
    let r = w.rank();
    w.transpose(r - 2, r - 1)?.contiguous()?.flip(&[r - 1])
}

/// The filter-rotation machinery shared by the lifting and group convolutions, used once per
/// layer to tabulate the rotations as a matrix ([`GroupConv`] keeps the matrix, not this).
#[derive(Clone, Debug)]
struct Rotator {
    n: usize,
    /// `(k, k)` disk of radius k/2 about the centre; `None` for N = 4 (rotations are exact).
    mask: Option<Tensor>,
}

impl Rotator {
    /// On the CPU in f64: it only tabulates [`Self::matrix`].
    fn new(n: usize, k: usize) -> Result<Self> {
        if n == 0 || !n.is_multiple_of(4) {
            candle_core::bail!("G-CNN group order {n}: must be a multiple of 4 (4, 8 or 16)");
        }
        let mask = if n == 4 {
            None
        } else {
            let c = (k as f64 - 1.0) / 2.0;
            let r2 = (k as f64 / 2.0).powi(2);
            let m: Vec<f64> = (0..k * k)
                .map(|p| {
                    let (i, j) = ((p / k) as f64 - c, (p % k) as f64 - c);
                    if i * i + j * j <= r2 {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            Some(Tensor::from_vec(m, (k, k), &candle_core::Device::Cpu)?)
        };
        Ok(Self { n, mask })
    }

    fn masked(&self, w: &Tensor) -> Result<Tensor> {
        match &self.mask {
            Some(m) => w.broadcast_mul(m),
            None => Ok(w.clone()),
        }
    }

    /// `w: (.., k, k)` rotated by 2πr/N: rot90^q after a bilinear rotation by the remainder.
    fn rotate(&self, w: &Tensor, r: usize) -> Result<Tensor> {
        let quarter = self.n / 4;
        let (q, m) = (r / quarter, r % quarter);
        let mut w = self.masked(w)?;
        if m != 0 {
            let dims = w.dims().to_vec();
            let k = dims[dims.len() - 1];
            // (.., k, k) -> (P, 1, k, k) for the warp, and back.
            let flat = w.reshape(((), 1, k, k))?;
            let angle = 2.0 * std::f64::consts::PI * m as f64 / self.n as f64;
            w = self.masked(&apply(&flat, Transform::Rotate, &[angle], Padding::Zeros)?.reshape(dims)?)?;
        }
        for _ in 0..q {
            w = rot90(&w)?;
        }
        Ok(w)
    }

    /// All N rotations as one matrix `(k², N·k²)`: row p is the rotations of the p-th unit
    /// filter, so `w (.., k²) · matrix` is every rotation of every filter in one matmul. The
    /// rotation is linear in the filter, so this is the same map (tabulated in f64), not an
    /// approximation of it.
    fn matrix(&self, k: usize) -> Result<Tensor> {
        let eye = Tensor::eye(k * k, candle_core::DType::F64, &candle_core::Device::Cpu)?.reshape((k * k, k, k))?;
        let rotated = (0..self.n)
            .map(|r| self.rotate(&eye, r)?.reshape((k * k, k * k)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rotated, 1)
    }
}

/// A lifting (`in_fields = None`: input `(B, Cin, H, W)`) or group convolution (input
/// `(B, Cin, N, H, W)`) to `(B, Cout, N, H, W)`, stride 1, "same" zero padding.
#[derive(Clone, Debug)]
pub struct GroupConv {
    /// `(Cout, Cin, k, k)` (lifting) or `(Cout, Cin, N, k, k)` (group).
    weight: Tensor,
    /// [`Rotator::matrix`] in the weight's dtype and device.
    rotations: Tensor,
    /// Group convs: for output orientation r and input orientation s, where the rotated filters
    /// `(s', r, p)` hold the entry of `(r, s, p)`: s' = (s − r) mod N (the roll).
    roll: Option<Tensor>,
    n: usize,
    k: usize,
}

impl GroupConv {
    pub fn load(in_c: usize, out_c: usize, n: usize, k: usize, lifting: bool, vb: VarBuilder) -> Result<Self> {
        let (shape, fan_in) = if lifting {
            (vec![out_c, in_c, k, k], in_c * k * k)
        } else {
            (vec![out_c, in_c, n, k, k], in_c * n * k * k)
        };
        let std = (2.0 / fan_in as f64).sqrt();
        let weight = param(&vb, &shape, "weight", ParamInit::Normal(std))?;
        let rotations = Rotator::new(n, k)?
            .matrix(k)?
            .to_dtype(weight.dtype())?
            .to_device(weight.device())?;
        let roll = if lifting {
            None
        } else {
            let kk = k * k;
            let idx: Vec<u32> = (0..n * n * kk)
                .map(|j| {
                    let (r, s, p) = (j / (n * kk), (j / kk) % n, j % kk);
                    (((s + n - r) % n) * n * kk + r * kk + p) as u32
                })
                .collect();
            Some(Tensor::from_vec(idx, n * n * kk, weight.device())?)
        };
        Ok(Self {
            weight,
            rotations,
            roll,
            n,
            k,
        })
    }

    /// The full filter bank `(Cout·N, Cin·[N], k, k)`, output channels ordered (field, r): for
    /// output orientation r, the base filter rotated by 2πr/N and (group convs) rolled by r along
    /// its input-orientation axis. One matmul and one gather, so the backward pass is as cheap.
    pub fn bank(&self) -> Result<Tensor> {
        let (n, k) = (self.n, self.k);
        let (cout, cin) = (self.weight.dim(0)?, self.weight.dim(1)?);
        let rotated = self.weight.reshape(((), k * k))?.matmul(&self.rotations)?;
        let (rotated, cin_all) = match &self.roll {
            // (Cout·Cin, (s', r, p)) -> (Cout·Cin, (r, s, p))
            Some(idx) => (rotated.reshape((cout * cin, ()))?.index_select(idx, 1)?, cin * n),
            None => (rotated, cin),
        };
        // (Cout, Cin, N, [N·]k²) -> (Cout, N, Cin, [N·]k²)
        rotated
            .reshape((cout, cin, n, ()))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((cout * n, cin_all, k, k))
    }

    fn conv(&self, x: &Tensor, bank: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (h, w) = (x.dim(x.rank() - 2)?, x.dim(x.rank() - 1)?);
        let cin_all = x.elem_count() / (b * h * w);
        // (B, Cin, [N,] H, W) -> (B, Cin·[N], H, W) -> (B, Cout·N, H, W) -> (B, Cout, N, H, W)
        let y = conv2d_op(&x.reshape((b, cin_all, h, w))?, bank, ConvSpec::same(self.k))?;
        y.reshape((b, (), self.n, h, w))
    }
}

impl Layer for GroupConv {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.conv(x, &self.bank()?)
    }
}

impl Jvp for GroupConv {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let bank = self.bank()?;
        let (m, t) = merge_tangent(dx)?; // (T, B, ..) -> (T·B, ..)
        Ok((self.conv(x, &bank)?, split_tangent(&self.conv(&m, &bank)?, t)?))
    }
}

/// Max over the orientation axis: `(B, C, N, H, W)` → `(B, C, H, W)`, an invariant of C_N.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupMaxPool;

impl Layer for GroupMaxPool {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        x.max(2)
    }
}

impl Jvp for GroupMaxPool {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        max_along(x, dx, 2)
    }
}

/// One layer: group conv, field batch norm, ReLU.
#[derive(Clone, Debug)]
struct Block {
    conv: GroupConv,
    bn: BatchNorm,
}

/// The C_N G-CNN classifier: images `(B, C, H, W)` → invariant logits `(B, K)`.
#[derive(Clone, Debug)]
pub struct Gcnn {
    blocks: Vec<Block>,
    head: Linear,
    order: usize,
}

impl Gcnn {
    /// Parameters: `block{i}.conv.weight` (block0 lifts), `block{i}.bn.*`, `head.*`.
    pub fn new(cfg: &GcnnConfig, in_chans: usize, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        if cfg.widths.is_empty() {
            candle_core::bail!("model.gcnn.widths is empty: give at least one layer width");
        }
        let mut blocks = Vec::with_capacity(cfg.widths.len());
        let mut in_c = in_chans;
        for (i, &w) in cfg.widths.iter().enumerate() {
            let vb = vb.pp(format!("block{i}"));
            blocks.push(Block {
                conv: GroupConv::load(in_c, w, cfg.group_order, cfg.kernel_size, i == 0, vb.pp("conv"))?,
                bn: BatchNorm::load(w, vb.pp("bn"))?,
            });
            in_c = w;
        }
        let head = Linear::load(in_c, num_classes, vb.pp("head"))?;
        Ok(Self {
            blocks,
            head,
            order: cfg.group_order,
        })
    }

    /// Everything before the head: the globally pooled features.
    fn body(&self, x: &Tensor, dx: Option<&Tensor>, train: bool, tape: &mut Tape) -> Result<Flow> {
        let mut f = Flow::new(x.clone(), dx.cloned());
        let last = self.blocks.len() - 1;
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("block{i}");
            f = f.apply(
                &b.conv,
                &format!("{p}.conv"),
                StepKind::GroupConv,
                Repr::Group,
                train,
                tape,
            )?;
            f = f.apply(&b.bn, &format!("{p}.bn"), StepKind::Norm, Repr::Group, train, tape)?;
            f = f.apply(
                &Relu,
                &format!("{p}.relu"),
                StepKind::Activation,
                Repr::Group,
                train,
                tape,
            )?;
            let h = f.x.dim(3)?;
            if i < last && h % 2 == 0 {
                let pool = AvgPool2d { k: 2 };
                f = f.apply(&pool, &format!("{p}.pool"), StepKind::Pool, Repr::Group, train, tape)?;
            }
        }
        f = f.apply(
            &GroupMaxPool,
            "group_pool",
            StepKind::GroupPool,
            Repr::Image,
            train,
            tape,
        )?;
        f = f.apply(&GlobalAvgPool, "pool", StepKind::Pool, Repr::Invariant, train, tape)?;
        Ok(f)
    }
}

impl Model for Gcnn {
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

    fn group_order(&self) -> Option<usize> {
        Some(self.order)
    }
}

impl Jvp for Gcnn {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let r = self.jvp_at(x, dx, tape, Readout::Logits)?;
        Ok((r.y, r.dy))
    }
}
