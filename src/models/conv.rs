//! The layers of the convolutional models (the CNN baseline and the C_N G-CNN): Conv2d (zero or
//! circular padding), BatchNorm (batch statistics in training, running statistics in eval), ReLU,
//! ELU, average / max / global average pooling and a linear head, each with its forward-mode
//! [`Jvp`]. Everything is built from differentiable candle ops (candle's fused norms cut the
//! gradient, DESIGN.md), so training and LEE-regularised training backprop through them.
//!
//! Layers do the maths only; the model that owns a layer records the step on the [`Tape`]
//! (through [`Flow::apply`]), because only the model knows the step's name and representation.
//! Parameter initialisation is seeded per parameter by its full name (see [`param`]), never by
//! candle's device RNG, so a model is a deterministic function of its config.

use crate::lie::{merge_tangent, split_tangent, tangent_mul, Jvp, Repr, StepKind, Tape};
use crate::models::Rng;
use candle_core::{Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};
use rand::{Rng as _, SeedableRng};
use rand_distr::{Distribution, Normal};

/// A layer's primal forward, in training (`train = true`: batch statistics, running-statistic
/// updates) or eval mode. Its [`Jvp`] is always eval mode.
pub trait Layer {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;
}

/// A value flowing through a model: the primal and, in a JVP pass, its tangent `(T, B, ...)`.
/// One walk of the architecture then serves forward, forward_train and jvp.
#[derive(Clone, Debug)]
pub struct Flow {
    pub x: Tensor,
    pub dx: Option<Tensor>,
}

impl Flow {
    pub fn new(x: Tensor, dx: Option<Tensor>) -> Self {
        Self { x, dx }
    }

    /// Run `layer`; in a JVP pass, push the tangent (eval mode) and record the step on the tape.
    pub fn apply<L: Layer + Jvp>(
        &self,
        layer: &L,
        name: &str,
        kind: StepKind,
        repr: Repr,
        train: bool,
        tape: &mut Tape,
    ) -> Result<Flow> {
        match &self.dx {
            None => Ok(Flow::new(layer.forward_t(&self.x, train)?, None)),
            Some(dx) => {
                let (y, dy) = layer.jvp(&self.x, dx, tape)?;
                let dy = tape.step(name, kind, repr, &y, dy)?;
                Ok(Flow::new(y, Some(dy)))
            }
        }
    }
}

/// How a parameter is initialised when the VarBuilder does not already hold it.
#[derive(Clone, Copy, Debug)]
pub enum ParamInit {
    Const(f64),
    /// N(0, std²) (Kaiming normal for ReLU nets: std = √(2 / fan_in)).
    Normal(f64),
    /// U(−b, b) (PyTorch's Linear default: b = 1/√fan_in).
    Uniform(f64),
}

/// FNV-1a: a stable seed from a parameter's full name.
fn name_seed(name: &str) -> u64 {
    name.bytes()
        .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Fetch parameter `name` from `vb`, or create it: values are drawn on the host from a ChaCha8
/// RNG seeded by the parameter's full path, so initialisation is deterministic and independent
/// of construction order. A VarMap-backed builder keeps the new tensor as a trainable Var.
pub fn param(vb: &VarBuilder, shape: &[usize], name: &str, init: ParamInit) -> Result<Tensor> {
    if vb.contains_tensor(name) {
        return vb.get(shape, name);
    }
    let std_or_bound = match init {
        ParamInit::Const(c) => return vb.get_with_hints(shape, name, Init::Const(c)),
        ParamInit::Normal(s) | ParamInit::Uniform(s) => s,
    };
    let t = vb.get_with_hints(shape, name, Init::Const(0.0))?;
    let full = if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    };
    let mut rng = Rng::seed_from_u64(name_seed(&full));
    let n: usize = shape.iter().product();
    let vals: Vec<f64> = if let ParamInit::Normal(_) = init {
        let dist = Normal::new(0.0, std_or_bound).map_err(|e| candle_core::Error::Msg(format!("init {full}: {e}")))?;
        (0..n).map(|_| dist.sample(&mut rng)).collect()
    } else {
        (0..n).map(|_| rng.random_range(-std_or_bound..std_or_bound)).collect()
    };
    let v = Tensor::from_vec(vals, shape, t.device())?.to_dtype(t.dtype())?;
    // The VarMap's tensor is a Var sharing storage with `t`: set it in place.
    Var::from_tensor(&t)?.set(&v)?;
    Ok(t)
}

/// Spatial padding of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    Zeros,
    /// Periodic: the image is a torus (exactly translation-equivariant at every shift).
    Circular,
}

/// Geometry of a 2-D convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub stride: usize,
    pub padding: usize,
    pub pad_mode: PadMode,
}

impl ConvSpec {
    /// Stride 1 with `(k−1)/2` zero padding: the output grid is the input grid.
    pub fn same(k: usize) -> Self {
        Self {
            stride: 1,
            padding: k / 2,
            pad_mode: PadMode::Zeros,
        }
    }
}

/// Circular padding of the last two axes by `p`.
fn pad_circular(x: &Tensor, p: usize) -> Result<Tensor> {
    let mut x = x.clone();
    for dim in [x.rank() - 2, x.rank() - 1] {
        let n = x.dim(dim)?;
        if p > n {
            candle_core::bail!("circular padding {p} exceeds the axis size {n}");
        }
        x = Tensor::cat(&[x.narrow(dim, n - p, p)?, x.clone(), x.narrow(dim, 0, p)?], dim)?;
    }
    Ok(x)
}

/// Cross-correlation of `x: (B, Cin, H, W)` with `w: (Cout, Cin, k, k)` under `spec`, no bias.
pub fn conv2d_op(x: &Tensor, w: &Tensor, spec: ConvSpec) -> Result<Tensor> {
    match spec.pad_mode {
        PadMode::Zeros => x.conv2d(w, spec.padding, spec.stride, 1, 1),
        PadMode::Circular if spec.padding == 0 => x.conv2d(w, 0, spec.stride, 1, 1),
        PadMode::Circular => pad_circular(x, spec.padding)?.conv2d(w, 0, spec.stride, 1, 1),
    }
}

/// `y = w ⋆ x + b`. Linear in x, so `dy = w ⋆ dx` (the T tangents merged into the batch).
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    spec: ConvSpec,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, spec: ConvSpec) -> Self {
        Self { weight, bias, spec }
    }

    /// `weight (out, in, k, k)` (Kaiming normal) and, if `bias`, `bias (out)` (zeros).
    pub fn load(in_c: usize, out_c: usize, k: usize, spec: ConvSpec, bias: bool, vb: VarBuilder) -> Result<Self> {
        let std = (2.0 / (in_c * k * k) as f64).sqrt();
        let weight = param(&vb, &[out_c, in_c, k, k], "weight", ParamInit::Normal(std))?;
        let bias = if bias {
            Some(param(&vb, &[out_c], "bias", ParamInit::Const(0.0))?)
        } else {
            None
        };
        Ok(Self::new(weight, bias, spec))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Layer for Conv2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        let y = conv2d_op(x, &self.weight, self.spec)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Jvp for Conv2d {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (m, t) = merge_tangent(dx)?; // (T, B, C, H, W) -> (T·B, C, H, W)
        let dy = split_tangent(&conv2d_op(&m, &self.weight, self.spec)?, t)?;
        Ok((self.forward_t(x, false)?, dy))
    }
}

/// Batch norm over every axis but 1 (channels / fields): `(B, C, H, W)` for the CNN, and
/// `(B, C, N, H, W)` for the G-CNN, where one statistic per field is shared by its N
/// orientation channels (so the normalisation commutes with rotations). PyTorch semantics:
/// biased batch variance to normalise, unbiased for the running estimate, momentum 0.1.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// Parameters `weight`, `bias` and buffers `running_mean`, `running_var`, each `(C)`.
    pub fn load(c: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: param(&vb, &[c], "weight", ParamInit::Const(1.0))?,
            bias: param(&vb, &[c], "bias", ParamInit::Const(0.0))?,
            running_mean: Var::from_tensor(&param(&vb, &[c], "running_mean", ParamInit::Const(0.0))?)?,
            running_var: Var::from_tensor(&param(&vb, &[c], "running_var", ParamInit::Const(1.0))?)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// A `(C)` vector shaped to broadcast against a rank-`rank` primal `(B, C, ...)`.
    fn per_channel(v: &Tensor, rank: usize) -> Result<Tensor> {
        let mut shape = vec![1, v.dim(0)?];
        shape.resize(rank, 1);
        v.reshape(shape)
    }

    /// Eval mode: `y = x·s + (β − μ·s)` with `s = γ / √(σ² + ε)` from the running statistics.
    fn eval_scale_shift(&self, rank: usize) -> Result<(Tensor, Tensor)> {
        let s = (&self.weight / (self.running_var.as_tensor() + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_tensor() * &s)?)?;
        Ok((Self::per_channel(&s, rank)?, Self::per_channel(&shift, rank)?))
    }
}

impl Layer for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let rank = x.rank();
        if !train {
            let (s, shift) = self.eval_scale_shift(rank)?;
            return x.broadcast_mul(&s)?.broadcast_add(&shift);
        }
        let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
        let n = x.elem_count() / x.dim(1)?;
        let mean = x.mean_keepdim(dims.as_slice())?; // (1, C, 1, ..)
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(dims.as_slice())?;
        let y = centred.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        let y = y
            .broadcast_mul(&Self::per_channel(&self.weight, rank)?)?
            .broadcast_add(&Self::per_channel(&self.bias, rank)?)?;
        // Running statistics are buffers: updated outside the graph.
        let m = self.momentum;
        let mean = mean.detach().flatten_all()?;
        let unbiased = (var.detach().flatten_all()? * (n as f64 / (n.max(2) - 1) as f64))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(y)
    }
}

impl Jvp for BatchNorm {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (s, shift) = self.eval_scale_shift(x.rank())?;
        let y = x.broadcast_mul(&s)?.broadcast_add(&shift)?;
        Ok((y, dx.broadcast_mul(&s.unsqueeze(0)?)?))
    }
}

/// max(x, 0); tangent masked by x > 0 (the kink at 0 gets tangent 0).
#[derive(Clone, Copy, Debug, Default)]
pub struct Relu;

impl Layer for Relu {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        x.relu()
    }
}

impl Jvp for Relu {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let mask = x.gt(0.0)?.to_dtype(x.dtype())?;
        Ok((x.relu()?, tangent_mul(dx, &mask)?))
    }
}

/// ELU: x for x > 0, α(eˣ − 1) otherwise; derivative 1 or α·eˣ.
#[derive(Clone, Copy, Debug)]
pub struct Elu {
    pub alpha: f64,
}

impl Layer for Elu {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        x.elu(self.alpha)
    }
}

impl Jvp for Elu {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let pos = x.gt(0.0)?;
        let slope = pos.where_cond(&x.ones_like()?, &(x.minimum(0.0)?.exp()? * self.alpha)?)?;
        Ok((x.elu(self.alpha)?, tangent_mul(dx, &slope)?))
    }
}

/// k×k average pooling with stride k on the last two axes of `(B, C, H, W)` or `(B, C, N, H, W)`
/// (linear: the tangent is pooled the same way).
/// A block grid on an even size is symmetric about the centre, so it commutes with rot90.
#[derive(Clone, Copy, Debug)]
pub struct AvgPool2d {
    pub k: usize,
}

impl AvgPool2d {
    /// Pool the last two axes of a tensor of any rank ≥ 3 (primal or tangent, image or group map).
    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let r = dims.len();
        let lead: usize = dims[..r - 2].iter().product();
        // (.., H, W) -> (L, 1, H, W) -> pooled -> (.., H/k, W/k)
        let y = x.reshape((lead, 1, dims[r - 2], dims[r - 1]))?.avg_pool2d(self.k)?;
        let mut out = dims[..r - 2].to_vec();
        out.extend_from_slice(&y.dims()[2..]);
        y.reshape(out)
    }
}

impl Layer for AvgPool2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.pool(x)
    }
}

impl Jvp for AvgPool2d {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        Ok((self.pool(x)?, self.pool(dx)?))
    }
}

/// The max of `x` along `dim` and the tangent taken at the (first) argmax, the element the
/// max came from. `dx` has one extra leading tangent axis.
pub fn max_along(x: &Tensor, dx: &Tensor, dim: usize) -> Result<(Tensor, Tensor)> {
    let idx = x.argmax_keepdim(dim)?; // (.., 1, ..) u32
    let y = x.gather(&idx, dim)?.squeeze(dim)?;
    let t = dx.dim(0)?;
    let mut shape = vec![t];
    shape.extend_from_slice(idx.dims());
    let idx = idx.unsqueeze(0)?.broadcast_as(shape)?.contiguous()?;
    Ok((y, dx.gather(&idx, dim + 1)?.squeeze(dim + 1)?))
}

/// k×k max pooling with stride k on `(B, C, H, W)`; H and W must be multiples of k.
#[derive(Clone, Copy, Debug)]
pub struct MaxPool2d {
    pub k: usize,
}

impl MaxPool2d {
    /// `(.., C, H, W)` → `(.., C, H/k, W/k, k·k)`: each pooling window on the last axis.
    fn windows(&self, x: &Tensor) -> Result<Tensor> {
        let r = x.rank();
        let (h, w) = (x.dim(r - 2)?, x.dim(r - 1)?);
        let k = self.k;
        if h % k != 0 || w % k != 0 {
            candle_core::bail!("max pool {k}×{k}: grid {h}×{w} is not a multiple of {k}");
        }
        let lead = x.dims()[..r - 2].to_vec();
        let mut s = lead.clone();
        s.extend_from_slice(&[h / k, k, w / k, k]);
        let x = x.reshape(s)?; // (.., H/k, k, W/k, k)
        let x = x.transpose(r - 1, r)?; // (.., H/k, W/k, k, k)
        let mut s = lead;
        s.extend_from_slice(&[h / k, w / k, k * k]);
        x.contiguous()?.reshape(s)
    }
}

impl Layer for MaxPool2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        x.max_pool2d(self.k)
    }
}

impl Jvp for MaxPool2d {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (_, dy) = max_along(&self.windows(x)?, &self.windows(dx)?, 4)?;
        Ok((x.max_pool2d(self.k)?, dy))
    }
}

/// Mean over the spatial axes: `(B, C, H, W)` → `(B, C)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalAvgPool;

impl Layer for GlobalAvgPool {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        x.mean((D::Minus2, D::Minus1))
    }
}

impl Jvp for GlobalAvgPool {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        Ok((self.forward_t(x, false)?, dx.mean((D::Minus2, D::Minus1))?))
    }
}

/// The classifier head `y = x·Wᵀ + b` on pooled features `(B, C)` → `(B, K)`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `weight (out, in)`, `bias (out)`, PyTorch's default U(±1/√in) initialisation.
    pub fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let b = 1.0 / (in_dim as f64).sqrt();
        Ok(Self {
            weight: param(&vb, &[out_dim, in_dim], "weight", ParamInit::Uniform(b))?,
            bias: param(&vb, &[out_dim], "bias", ParamInit::Uniform(b))?,
        })
    }
}

impl Layer for Linear {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

impl Jvp for Linear {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        Ok((self.forward_t(x, false)?, dx.broadcast_matmul(&self.weight.t()?)?))
    }
}
