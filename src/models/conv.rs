//! The layers of the convolutional models (the CNN baseline and the C_N G-CNN): Conv2d (zero or
//! circular padding), BatchNorm (batch statistics in training, running statistics in eval), ReLU,
//! ELU, average / max / global average pooling and a linear head, each with its forward-mode
//! [`Jvp`]. Everything is built from differentiable candle ops (candle's fused norms cut the
//! gradient, DESIGN.md), so training and LEE-regularised training backprop through them.
//!
//! Layers do the maths only; the model that owns a layer records the step on the [`Tape`]
//! (through [`Flow::apply`]), because only the model knows the step's name and representation.
//! Parameter values come from the VarBuilder's init hints; models built through
//! [`crate::models::build_model`] draw them from the run seed (see [`crate::models::init`]).

use super::{Readout, ReadoutJvp};
use crate::jvp::{add_tangents, merge_tangent, split_tangent, tangent_mul, Jvp, Repr, StepKind, Tape};
use crate::kernels::{depthwise_conv2d, fusable, im2col};
use candle_core::{Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

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

impl Flow {
    /// The residual sum `self + other` of two image flows; in a JVP pass the sum of their
    /// tangents is recorded as step `name`.
    pub fn add(&self, other: &Flow, name: &str, tape: &mut Tape) -> Result<Flow> {
        let y = (&self.x + &other.x)?;
        let dy = match (&self.dx, &other.dx) {
            (Some(a), Some(b)) => Some(tape.step(name, StepKind::Residual, Repr::Image, &y, add_tangents(a, b)?)?),
            _ => None,
        };
        Ok(Flow::new(y, dy))
    }
}

/// `prefix.name`, or `name` at the root.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// conv → batch norm, each a step named by its parameters' path.
#[derive(Clone, Debug)]
pub struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
    conv_name: String,
    bn_name: String,
}

impl ConvBn {
    /// A bias-free k×k conv with `(k − 1)/2` zero padding at `vb.pp(conv)` and its batch norm
    /// (weight initialised to `gamma`) at `vb.pp(bn)`.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        vb: &VarBuilder,
        conv: &str,
        bn: &str,
        gamma: f64,
    ) -> Result<Self> {
        let spec = ConvSpec {
            stride,
            padding: k / 2,
            pad_mode: PadMode::Zeros,
        };
        Ok(Self {
            conv: Conv2d::load(in_c, out_c, k, spec, false, vb.pp(conv))?,
            bn: BatchNorm::load_init(out_c, gamma, vb.pp(bn))?,
            conv_name: join(&vb.prefix(), conv),
            bn_name: join(&vb.prefix(), bn),
        })
    }

    pub fn run(&self, f: &Flow, train: bool, tape: &mut Tape) -> Result<Flow> {
        let f = f.apply(&self.conv, &self.conv_name, StepKind::Conv, Repr::Image, train, tape)?;
        f.apply(&self.bn, &self.bn_name, StepKind::Norm, Repr::Image, train, tape)
    }
}

/// The end of a conv net's JVP at `at`, from its flow after global pooling (`features`, with a
/// tangent): through the head for the logits, or the features themselves (the head then runs on
/// the primal only, for the logits that come along).
/// `name` is the head's step name.
pub fn head_readout(features: Flow, head: &Linear, at: Readout, name: &str, tape: &mut Tape) -> Result<ReadoutJvp> {
    let f = match at {
        Readout::Tokens => candle_core::bail!("a conv net has no tokens: measure its \"features\" or its outputs"),
        Readout::Features => features,
        Readout::Logits => features.apply(head, name, StepKind::Head, Repr::Invariant, false, tape)?,
    };
    let dy =
        f.dx.ok_or_else(|| candle_core::Error::Msg("a conv net's jvp lost its tangent".into()))?;
    let logits = match at {
        Readout::Logits => f.x.clone(),
        _ => head.forward_t(&f.x, false)?,
    };
    Ok(ReadoutJvp { logits, y: f.x, dy })
}

/// `Model` and `Jvp` for a conv net whose `body(x, dx, rng, tape)` ends at its pooled features
/// (a [`Flow`]) and whose field `fc` is the linear head, its step named `$head`.
macro_rules! pooled_net_model {
    ($ty:ty, $head:literal) => {
        impl $crate::models::Model for $ty {
            fn forward(&self, x: &Tensor) -> Result<Tensor> {
                self.fc
                    .forward_t(&self.body(x, None, None, &mut Tape::off())?.x, false)
            }

            fn forward_train(&self, x: &Tensor, rng: &mut $crate::models::Rng) -> Result<Tensor> {
                self.fc
                    .forward_t(&self.body(x, None, Some(rng), &mut Tape::off())?.x, true)
            }

            fn jvp_at(
                &self,
                x: &Tensor,
                dx: &Tensor,
                tape: &mut Tape,
                at: $crate::models::Readout,
            ) -> Result<$crate::models::ReadoutJvp> {
                $crate::models::conv::head_readout(self.body(x, Some(dx), None, tape)?, &self.fc, at, $head, tape)
            }
        }

        impl Jvp for $ty {
            fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
                let r = $crate::models::Model::jvp_at(self, x, dx, tape, $crate::models::Readout::Logits)?;
                Ok((r.y, r.dy))
            }
        }
    };
}
pub(crate) use pooled_net_model;

/// How a parameter is initialised when the VarBuilder does not already hold it.
#[derive(Clone, Copy, Debug)]
pub enum ParamInit {
    Const(f64),
    /// N(0, std²) (Kaiming normal for ReLU nets: std = √(2 / fan_in)).
    Normal(f64),
    /// U(−b, b) (PyTorch's Linear default: b = 1/√fan_in).
    Uniform(f64),
}

/// Fetch parameter `name` from `vb`, or create it with `init` (a VarBuilder from
/// [`crate::models::init::SeededVarMap`] draws the values from the run seed and the name).
pub fn param(vb: &VarBuilder, shape: &[usize], name: &str, init: ParamInit) -> Result<Tensor> {
    let hint = match init {
        ParamInit::Const(c) => Init::Const(c),
        ParamInit::Normal(std) => Init::Randn { mean: 0.0, stdev: std },
        ParamInit::Uniform(b) => Init::Uniform { lo: -b, up: b },
    };
    vb.get_with_hints(shape, name, hint)
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
/// On the CPU (f32 / f64) as im2col + matmul ([`crate::kernels::im2col`]: its backward is two matmuls,
/// where candle's is a direct loop), elsewhere candle's `conv2d`.
pub fn conv2d_op(x: &Tensor, w: &Tensor, spec: ConvSpec) -> Result<Tensor> {
    let (x, padding) = match spec.pad_mode {
        PadMode::Zeros => (x.clone(), spec.padding),
        PadMode::Circular if spec.padding == 0 => (x.clone(), 0),
        PadMode::Circular => (pad_circular(x, spec.padding)?, 0),
    };
    if fusable(&x) {
        im2col::conv2d(&x, w, padding, spec.stride)
    } else {
        x.conv2d(w, padding, spec.stride, 1, 1)
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

/// Depthwise `y = w ⋆ x + b` (one k×k filter per channel, stride 1, same padding; ConvNeXt's
/// `conv_dw`), `weight (C, 1, k, k)`, `bias (C)`. Linear in x: `dy = w ⋆ dx`.
#[derive(Clone, Debug)]
pub struct DepthwiseConv2d {
    weight: Tensor,
    bias: Tensor,
}

impl DepthwiseConv2d {
    /// timm's ConvNeXt initialisation: weight N(0, 0.02²) (truncated there), bias 0.
    pub fn load(c: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: param(&vb, &[c, 1, k, k], "weight", ParamInit::Normal(0.02))?,
            bias: param(&vb, &[c], "bias", ParamInit::Const(0.0))?,
        })
    }

    fn conv(&self, x: &Tensor) -> Result<Tensor> {
        depthwise_conv2d(x, &self.weight, self.weight.dim(2)? / 2)
    }
}

impl Layer for DepthwiseConv2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.conv(x)?.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

impl Jvp for DepthwiseConv2d {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (m, t) = merge_tangent(dx)?;
        Ok((self.forward_t(x, false)?, split_tangent(&self.conv(&m)?, t)?))
    }
}

/// Whether a variable is a batch-norm buffer (running statistics) rather than a parameter:
/// written by train-mode passes, never by an optimiser.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Batch norm over every axis but 1 (channels / fields): `(B, C, H, W)` for the CNN, and
/// `(B, C, N, H, W)` for the G-CNN, where one statistic per field is shared by its N
/// orientation channels (so the normalisation commutes with rotations). PyTorch semantics:
/// biased batch variance to normalise, unbiased for the running estimate, momentum 0.1.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    /// Buffers, updated in place by train-mode passes: `Var` tensors in the trained model, detached
    /// views of them (same storage) in [`crate::models::frozen`] models, which thus see every
    /// update. (Wrapping a view in a new `Var` would copy it: frozen models would evaluate with
    /// the statistics of the moment they were built.)
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// Parameters `weight`, `bias` and buffers `running_mean`, `running_var`, each `(C)`.
    pub fn load(c: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_init(c, 1.0, vb)
    }

    /// [`BatchNorm::load`] with `weight` initialised to `gamma` (0: timm's `zero_init_last`, a
    /// residual block that starts as the identity).
    pub fn load_init(c: usize, gamma: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: param(&vb, &[c], "weight", ParamInit::Const(gamma))?,
            bias: param(&vb, &[c], "bias", ParamInit::Const(0.0))?,
            running_mean: param(&vb, &[c], "running_mean", ParamInit::Const(0.0))?,
            running_var: param(&vb, &[c], "running_var", ParamInit::Const(1.0))?,
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

    /// Eval mode: `y = x·s + (β − μ·s)` with `s = γ / √(σ² + ε)` from the running statistics,
    /// detached: they are buffers, so a loss through eval mode (the LEE penalty's JVP) must not
    /// hand them gradients that an optimiser would then apply.
    fn eval_scale_shift(&self, rank: usize) -> Result<(Tensor, Tensor)> {
        let s = (&self.weight / (self.running_var.detach() + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.detach() * &s)?)?;
        Ok((Self::per_channel(&s, rank)?, Self::per_channel(&shift, rank)?))
    }
}

impl Layer for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train {
            let (s, shift) = self.eval_scale_shift(x.rank())?;
            return x.broadcast_mul(&s)?.broadcast_add(&shift);
        }
        // Statistics over a contiguous last axis (candle's multi-axis reductions over strided
        // axes are ~10× slower): (B, C, ..) -> (C, B, ..) -> (C, B·..).
        let c = x.dim(1)?;
        let moved = x.transpose(0, 1)?.contiguous()?;
        let xc = moved.reshape((c, ()))?;
        let n = xc.dim(1)?;
        let mean = xc.mean_keepdim(1)?; // (C, 1)
        let centred = xc.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(1)?; // biased, (C, 1)
        let scale = (self.weight.unsqueeze(1)? / (&var + self.eps)?.sqrt()?)?;
        let yc = centred.broadcast_mul(&scale)?.broadcast_add(&self.bias.unsqueeze(1)?)?;
        // (C, B·..) -> (C, B, ..) -> (B, C, ..)
        let y = yc.reshape(moved.shape())?.transpose(0, 1)?.contiguous()?;
        // Running statistics are buffers: updated outside the graph.
        let m = self.momentum;
        let mean = mean.detach().flatten_all()?;
        let unbiased = (var.detach().flatten_all()? * (n as f64 / (n.max(2) - 1) as f64))?;
        let rm = ((&self.running_mean * (1.0 - m))? + (mean * m)?)?;
        let rv = ((&self.running_var * (1.0 - m))? + (unbiased * m)?)?;
        for (buffer, new) in [(&self.running_mean, rm), (&self.running_var, rv)] {
            if !buffer.is_variable() {
                candle_core::bail!(
                    "batch norm: a train-mode pass on an inference-only model (models::frozen), whose \
                     running statistics are views that training must not write; train the model built \
                     on the variables"
                );
            }
            // A variable's tensor wraps into a `Var` without a copy: the update is in place.
            Var::from_tensor(buffer)?.set(&new)?;
        }
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

/// k×k max pooling with stride `stride` and `pad` pixels of −∞ padding on `(B, C, H, W)`
/// (PyTorch's `max_pool2d`, floor mode: ResNet's stem pool is k 3, stride 2, pad 1). The output
/// is the window element at the arg-max, so the JVP (and the backward) follows that one element.
/// Ties go to the first maximum in row-major window order, as PyTorch's CPU kernel picks them.
#[derive(Clone, Copy, Debug)]
pub struct MaxPool2d {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool2d {
    /// k×k windows with stride k and no padding.
    pub fn new(k: usize) -> Self {
        Self { k, stride: k, pad: 0 }
    }

    fn out_len(&self, n: usize) -> Result<usize> {
        if self.k == 0 || self.stride == 0 || self.pad * 2 > self.k || n + 2 * self.pad < self.k {
            candle_core::bail!(
                "max pool {k}×{k}, stride {s}, padding {p} does not fit a side of {n}",
                k = self.k,
                s = self.stride,
                p = self.pad
            );
        }
        Ok((n + 2 * self.pad - self.k) / self.stride + 1)
    }

    /// `(.., H, W)` → `(.., H', W', k·k)`: each pooling window on the last axis (row-major taps),
    /// the padding filled with `fill`.
    fn windows(&self, x: &Tensor, fill: f64) -> Result<Tensor> {
        let r = x.rank();
        let (h, w) = (x.dim(r - 2)?, x.dim(r - 1)?);
        let (oh, ow) = (self.out_len(h)?, self.out_len(w)?);
        let s = self.stride;
        // Pad so that every tap's strided run of `s·out` elements stays inside.
        let mut x = x.clone();
        for (axis, n, o) in [(r - 2, h, oh), (r - 1, w, ow)] {
            let after = (self.k - 1 + s * o).saturating_sub(n + self.pad);
            let mut parts = Vec::new();
            for len in [self.pad, after] {
                let mut shape = x.dims().to_vec();
                shape[axis] = len;
                parts.push(
                    (len > 0)
                        .then(|| Tensor::full(fill, shape, x.device())?.to_dtype(x.dtype()))
                        .transpose()?,
                );
            }
            let mut all: Vec<Tensor> = parts[0].iter().cloned().collect();
            all.push(x.clone());
            all.extend(parts[1].iter().cloned());
            x = Tensor::cat(&all, axis)?;
        }
        let lead = x.dims()[..r - 2].to_vec();
        let mut taps = Vec::with_capacity(self.k * self.k);
        for i in 0..self.k {
            // Rows i, i + s, …, i + s·(oh − 1): a run of s·oh rows viewed as (oh, s), column 0.
            let mut rs = lead.clone();
            rs.extend_from_slice(&[oh, s, x.dim(r - 1)?]);
            let rows = x
                .narrow(r - 2, i, s * oh)?
                .reshape(rs)?
                .narrow(r - 1, 0, 1)?
                .squeeze(r - 1)?;
            for j in 0..self.k {
                let mut cs = lead.clone();
                cs.extend_from_slice(&[oh, ow, s]);
                let tap = rows.narrow(r - 1, j, s * ow)?.reshape(cs)?.narrow(r, 0, 1)?;
                taps.push(tap);
            }
        }
        Tensor::cat(&taps, r)
    }

    /// The pooled values and, given tangents `dx: (T, ..)`, the tangent at each window's arg-max.
    fn pool(&self, x: &Tensor, dx: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let xw = self.windows(x, f64::NEG_INFINITY)?;
        let last = xw.rank() - 1;
        let Some(dx) = dx else {
            let idx = xw.argmax_keepdim(last)?;
            return Ok((xw.gather(&idx, last)?.squeeze(last)?, None));
        };
        let (y, dy) = max_along(&xw, &self.windows(dx, 0.0)?, last)?;
        Ok((y, Some(dy)))
    }
}

impl Layer for MaxPool2d {
    fn forward_t(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(self.pool(x, None)?.0)
    }
}

impl Jvp for MaxPool2d {
    fn jvp(&self, x: &Tensor, dx: &Tensor, _tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let (y, dy) = self.pool(x, Some(dx))?;
        Ok((
            y,
            dy.ok_or_else(|| candle_core::Error::Msg("max pool lost its tangent".into()))?,
        ))
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
