//! Transformer building blocks with an exact forward-mode JVP: linear, LayerNorm, GELU (exact
//! erf, as timm), softmax, multi-head self-attention, MLP, patch embedding and drop path.
//!
//! Layout and parameter names follow timm's `vision_transformer.py` (and facebookresearch/mae,
//! which uses timm's `Block`), so timm checkpoints load by name. Every forward has a backward:
//! candle-nn's fused LayerNorm / softmax / sdpa silently cut the gradient (DESIGN.md, "Candle
//! facts"), so LayerNorm, softmax and GELU run on `crate::kernels` (one-pass CPU kernels with their
//! own backward, composed candle ops on other devices) and the rest on composed candle ops. Tangents follow the [`Jvp`] convention `dx: (T, B, ...)`.
//! These leaf layers do not call [`Tape::step`]: the composite models (`vit`, `mae`) name the
//! steps, because only they know the token grid a step's output lives on.

use crate::jvp::{merge_tangent, split_tangent, Jvp, Tape};
use crate::kernels;
use crate::models::Rng;
use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::Rng as _;

/// A fully connected layer `y = x·Wᵀ + b` on the last axis; `weight: (out, in)` (PyTorch layout).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// timm / MAE initialisation: Xavier-uniform weight, zero bias.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let a = (6.0 / (in_dim + out_dim) as f64).sqrt();
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", Init::Uniform { lo: -a, up: a })?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `x: (..., in)` → `(..., out)`; the bias is skipped for tangents.
    fn apply(&self, x: &Tensor, with_bias: bool) -> Result<Tensor> {
        kernels::linear(x, &self.weight, self.bias.as_ref().filter(|_| with_bias))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    /// `forward(x) + residual`, one op where nothing tracks a gradient.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        kernels::linear_add(x, &self.weight, self.bias.as_ref(), residual)
    }

    /// The JVP of `forward(x) + residual` from the residual's own `(residual, dresidual)`.
    pub fn jvp_add(&self, (x, dx): (&Tensor, &Tensor), (r, dr): (&Tensor, &Tensor)) -> Result<(Tensor, Tensor)> {
        Ok((
            self.forward_add(x, r)?,
            kernels::linear_add(dx, &self.weight, None, dr)?,
        ))
    }
}

impl Jvp for Linear {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        Ok((self.apply(x, true)?, self.apply(dx, false)?))
    }
}

/// LayerNorm over the last axis, written from differentiable ops (biased variance, as PyTorch).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
    Ok(LayerNorm { weight, bias, eps })
}

impl LayerNorm {
    /// One fused pass on CPU (`crate::kernels`, with its own backward), composed elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

impl Jvp for LayerNorm {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        kernels::layer_norm_jvp(x, dx, &self.weight, &self.bias, self.eps)
    }
}

/// Exact GELU, x·Φ(x) with Φ the standard normal CDF (timm's `nn.GELU()`), and its JVP on the
/// fused kernels (exact derivatives; candle's own `gelu_erf` backward truncates 1/√(2π)).
#[derive(Clone, Copy, Debug, Default)]
pub struct Gelu;

impl Gelu {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::gelu_erf(x)
    }
}

impl Jvp for Gelu {
    /// d gelu = gelu'(x)·dx = (Φ(x) + x·φ(x))·dx.
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        kernels::gelu_erf_jvp(x, dx)
    }
}

/// Softmax over the last axis from differentiable ops (the max shift is a constant: detached).
#[derive(Clone, Copy, Debug, Default)]
pub struct Softmax;

impl Softmax {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::softmax(x)
    }
}

impl Jvp for Softmax {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let s = self.forward(x)?;
        let ds = kernels::softmax_tangent(&s, dx)?;
        Ok((s, ds))
    }
}

/// A transformer block's residual branch that ends in a linear layer (attention: qkv → heads →
/// proj; MLP: fc1 → GELU → fc2), so that the block's residual add can ride in that layer's op
/// ([`Linear::forward_add`]).
pub trait ResidualBranch {
    /// Everything before the output layer.
    fn inner(&self, x: &Tensor) -> Result<Tensor>;

    /// The JVP of [`ResidualBranch::inner`].
    fn inner_jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)>;

    /// The branch's last layer.
    fn output(&self) -> &Linear;

    /// `x: (B, N, D)` → `(B, N, D)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.output().forward(&self.inner(x)?)
    }

    /// `forward(x) + residual` (see [`Linear::forward_add`]).
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.output().forward_add(&self.inner(x)?, residual)
    }

    /// The branch's JVP (what its [`Jvp`] impl returns).
    fn branch_jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (h, dh) = self.inner_jvp(x, dx, tape)?;
        self.output().jvp(&h, &dh, tape)
    }

    /// The JVP of `forward(x) + residual` (see [`Linear::jvp_add`]).
    fn jvp_add(
        &self,
        (x, dx): (&Tensor, &Tensor),
        residual: (&Tensor, &Tensor),
        tape: &mut Tape,
    ) -> Result<(Tensor, Tensor)> {
        let (h, dh) = self.inner_jvp(x, dx, tape)?;
        self.output().jvp_add((&h, &dh), residual)
    }
}

/// Multi-head self-attention with a fused `qkv` projection (timm `Attention`).
#[derive(Clone, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    scale: f64,
}

pub fn attention(dim: usize, heads: usize, qkv_bias: bool, vb: VarBuilder) -> Result<Attention> {
    if heads == 0 || !dim.is_multiple_of(heads) {
        candle_core::bail!(
            "attention at '{}': {heads} heads do not divide the width {dim}",
            vb.prefix()
        );
    }
    Ok(Attention {
        qkv: linear(dim, 3 * dim, qkv_bias, vb.pp("qkv"))?,
        proj: linear(dim, dim, true, vb.pp("proj"))?,
        heads,
        scale: ((dim / heads) as f64).powf(-0.5),
    })
}

impl ResidualBranch for Attention {
    /// The heads' outputs, concatenated.
    fn inner(&self, x: &Tensor) -> Result<Tensor> {
        kernels::attention(&self.qkv.forward(x)?, self.heads, self.scale)
    }

    fn inner_jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (qkv, dqkv) = self.qkv.jvp(x, dx, tape)?;
        kernels::attention_jvp(&qkv, &dqkv, self.heads, self.scale)
    }

    fn output(&self) -> &Linear {
        &self.proj
    }
}

impl Jvp for Attention {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        self.branch_jvp(x, dx, tape)
    }
}

/// The transformer MLP `fc2(gelu(fc1(x)))` (timm `Mlp`, no dropout).
#[derive(Clone, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub act: Gelu,
    pub fc2: Linear,
}

pub fn mlp(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Mlp> {
    Ok(Mlp {
        fc1: linear(dim, hidden, true, vb.pp("fc1"))?,
        act: Gelu,
        fc2: linear(hidden, dim, true, vb.pp("fc2"))?,
    })
}

impl ResidualBranch for Mlp {
    /// GELU of the hidden layer.
    fn inner(&self, x: &Tensor) -> Result<Tensor> {
        self.act.forward(&self.fc1.forward(x)?)
    }

    fn inner_jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (h, dh) = self.fc1.jvp(x, dx, tape)?;
        self.act.jvp(&h, &dh, tape)
    }

    fn output(&self) -> &Linear {
        &self.fc2
    }

    /// In training, fc2's input `gelu(h)` is recomputed by the backward, not kept
    /// ([`kernels::gelu_linear_add`]).
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        kernels::gelu_linear_add(&h, &self.fc2.weight, self.fc2.bias.as_ref(), residual)
    }
}

impl Jvp for Mlp {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        self.branch_jvp(x, dx, tape)
    }
}

/// Patch embedding as patchify + matmul: identical to timm's stride-p conv (`proj.weight:
/// (D, C, p, p)`), and much faster to differentiate on CPU than candle's conv2d.
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    /// Weight `(D, C·p·p)`: the conv weight flattened in (C, kh, kw) order.
    proj: Linear,
    patch: usize,
}

/// `bias = false`: no `proj.bias` (timm's `pre_norm` ViTs).
pub fn patch_embed(in_chans: usize, dim: usize, patch: usize, bias: bool, vb: VarBuilder) -> Result<PatchEmbed> {
    let vb = vb.pp("proj");
    let k = in_chans * patch * patch;
    // MAE initialises the conv as a linear layer: Xavier-uniform on the (D, C·p·p) view.
    let a = (6.0 / (k + dim) as f64).sqrt();
    let weight = vb.get_with_hints((dim, in_chans, patch, patch), "weight", Init::Uniform { lo: -a, up: a })?;
    let bias = bias
        .then(|| vb.get_with_hints(dim, "bias", Init::Const(0.0)))
        .transpose()?;
    Ok(PatchEmbed {
        proj: Linear::new(weight.reshape((dim, k))?, bias),
        patch,
    })
}

impl PatchEmbed {
    /// `x: (B, C, H, W)` → `(B, h·w, C·p·p)`, patches in row-major grid order.
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = x.dims4()?;
        let p = self.patch;
        if !hh.is_multiple_of(p) || !ww.is_multiple_of(p) {
            candle_core::bail!("patch embedding: patch size {p} does not divide the {hh}×{ww} image");
        }
        let (h, w) = (hh / p, ww / p);
        // (B, C, h, p, w, p) -> (B, h, w, C, p, p) -> (B, h·w, C·p·p)
        x.reshape((b, c, h, p, w, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, h * w, c * p * p))
    }

    /// `x: (B, C, H, W)` → tokens `(B, h·w, D)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.patchify(x)?)
    }
}

impl Jvp for PatchEmbed {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (dxm, t) = merge_tangent(dx)?; // (T·B, C, H, W)
        let (y, dy) = self.proj.jvp(&self.patchify(x)?, &self.patchify(&dxm)?, tape)?;
        Ok((y, split_tangent(&dy, t)?))
    }
}

/// Stochastic depth (timm `DropPath`): in training, each sample's residual branch is dropped
/// with probability `rate` and the kept ones scaled by 1/(1 − rate); identity in eval mode.
#[derive(Clone, Copy, Debug)]
pub struct DropPath {
    pub rate: f64,
}

impl DropPath {
    /// Whether [`DropPath::forward`] returns its input unchanged (eval mode, or a zero rate).
    pub fn is_identity(&self, training: bool) -> bool {
        !training || self.rate <= 0.0
    }

    /// `x: (B, ...)`; `rng = None` is eval mode.
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let Some(rng) = rng else { return Ok(x.clone()) };
        if self.rate <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.rate;
        let b = x.dim(0)?;
        let mask: Vec<f64> = (0..b)
            .map(|_| if rng.random::<f64>() < keep { 1.0 / keep } else { 0.0 })
            .collect();
        let mut shape = vec![1; x.rank()];
        shape[0] = b;
        let mask = Tensor::from_vec(mask, shape, x.device())?.to_dtype(x.dtype())?;
        x.broadcast_mul(&mask)
    }
}

impl Jvp for DropPath {
    /// Eval mode: the identity.
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        Ok((x.clone(), dx.clone()))
    }
}

/// A zero tangent `(T, ...)` shaped like `like` with T directions, in `like`'s dtype.
pub(crate) fn zero_tangent(t: usize, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![t];
    shape.extend_from_slice(like.dims());
    Tensor::zeros(shape, like.dtype(), like.device())
}
