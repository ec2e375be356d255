//! Forward-mode JVP: the contract every layer and model implements, the tangent layout and its
//! helpers, and the tape that turns one JVP pass into the layerwise decomposition of the
//! paper's Eq. 6. Sits between the kernels (whose tangent layout it re-exports) and the models.
//!
//! Tangents carry a leading axis of T directions: `x: (B, ...)`, `dx: (T, B, ...)`. One primal
//! pass then pushes several tangents at once (every transform of an LEE measurement, or every
//! step's error in the layerwise decomposition). Tangents are made of ordinary differentiable
//! candle ops, so backprop through them gives the gradient of LEE (LEE-regularised training).

pub use crate::kernels::tangent::{merge_tangent, split_tangent, tangent_mul};
pub use crate::transforms::Repr;
use crate::transforms::{lie_derivative, Stencil, Transform};
use candle_core::{Result, Tensor};

/// A layer or model that can push tangents through itself.
pub trait Jvp {
    /// `x: (B, ...)`, `dx: (T, B, ...)` → `(y, dy)` with `dy: (T, B, ...)` = J(x)·dx, eval mode.
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)>;
}

/// The kind of a network step, for the layerwise report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    PatchEmbed,
    PosEmbed,
    ClsToken,
    Norm,
    Attention,
    Linear,
    Activation,
    Residual,
    Conv,
    GroupConv,
    Pool,
    GroupPool,
    Head,
    Softmax,
}

/// One step of the layerwise decomposition, in network order.
#[derive(Clone, Debug)]
pub struct StepRecord {
    pub name: String,
    pub kind: StepKind,
    /// Index of this step's error in the tangent axis (its contribution at the output).
    pub channel: usize,
    /// Per image ‖e_i‖², the squared norm of this step's own error at its output (before the
    /// rest of the network acts on it): the subpixel limit of a layerwise EQ-T_frac.
    pub error_sq: Vec<f64>,
    /// Elements per image of this step's output (the N of EQ-T_frac's normalisations).
    pub numel: usize,
}

/// The layerwise state: the transform whose decomposition is computed and the steps seen.
#[derive(Debug)]
pub struct Layerwise {
    pub transform: Transform,
    pub stencil: Stencil,
    pub steps: Vec<StepRecord>,
}

/// Passed through every `jvp`. Off, it costs nothing. In layerwise mode each step replaces its
/// local tangent (channel 0) by the canonical Lie derivative L_X y of its own output and appends
/// its error e_i = J_i·L_X y_{i-1} − L_X y_i as a new channel, which the rest of the network then
/// carries to the output: channel i at the output is J_{N:i+1}·e_i, and the channels sum to the
/// end-to-end Lie derivative (telescoping; the final output is invariant so its L_X is 0).
#[derive(Debug, Default)]
pub struct Tape {
    layerwise: Option<Layerwise>,
    /// Capture mode: every step's output, in network order.
    captured: Option<Vec<Captured>>,
}

/// A step's output as [`Tape::capture`] records it (the hidden layers of `lie::group`).
#[derive(Clone, Debug)]
pub struct Captured {
    pub name: String,
    pub kind: StepKind,
    pub repr: Repr,
    pub y: Tensor,
}

impl Tape {
    /// Plain JVP: steps pass tangents through untouched.
    pub fn off() -> Self {
        Self::default()
    }

    /// Record every step's output (tangents pass untouched).
    pub fn capture() -> Self {
        Self {
            layerwise: None,
            captured: Some(Vec::new()),
        }
    }

    /// The outputs recorded in capture mode (empty otherwise).
    pub fn captured(&self) -> &[Captured] {
        self.captured.as_deref().unwrap_or(&[])
    }

    /// Layerwise decomposition for one transform; the input tangent must have T = 1.
    pub fn layerwise(transform: Transform, stencil: Stencil) -> Self {
        Self {
            layerwise: Some(Layerwise {
                transform,
                stencil,
                steps: Vec::new(),
            }),
            captured: None,
        }
    }

    pub fn is_layerwise(&self) -> bool {
        self.layerwise.is_some()
    }

    /// Whether the steps are recorded (layerwise or capture): a model that runs its steps on
    /// several copies of the input cannot take part.
    pub fn is_recording(&self) -> bool {
        self.layerwise.is_some() || self.captured.is_some()
    }

    /// The recorded steps (empty when off).
    pub fn steps(&self) -> &[StepRecord] {
        self.layerwise.as_ref().map_or(&[], |l| &l.steps)
    }

    /// Called by a layer once it has its output `y: (B, ...)` and propagated tangent
    /// `dy: (T, B, ...)`. Returns the tangent the rest of the network should carry.
    pub fn step(&mut self, name: &str, kind: StepKind, repr: Repr, y: &Tensor, dy: Tensor) -> Result<Tensor> {
        if let Some(c) = self.captured.as_mut() {
            c.push(Captured {
                name: name.to_string(),
                kind,
                repr,
                y: y.clone(),
            });
        }
        let Some(lw) = self.layerwise.as_mut() else {
            return Ok(dy);
        };
        let local = dy.narrow(0, 0, 1)?; // (1, B, ...)
        let canonical = lie_derivative(y, repr, lw.transform, lw.stencil)?.unsqueeze(0)?;
        let error = (local - &canonical)?;
        let channel = lw.steps.len() + 1;
        // (1, B, ...) -> (B, numel) -> per-image ‖e_i‖²
        let b = y.dim(0)?;
        let numel = y.elem_count() / b.max(1);
        let error_sq = error
            .reshape((b, numel))?
            .sqr()?
            .sum(1)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?;
        lw.steps.push(StepRecord {
            name: name.to_string(),
            kind,
            channel,
            error_sq,
            numel,
        });
        // Earlier channels keep their places; missing ones (from other branches) are zero.
        let t = dy.dim(0)?;
        let mut parts = vec![canonical];
        if t > 1 {
            parts.push(dy.narrow(0, 1, t - 1)?);
        }
        if t < channel {
            parts.push(zeros_channels(&dy, channel - t)?);
        }
        parts.push(error);
        Tensor::cat(&parts, 0)
    }
}

fn zeros_channels(like: &Tensor, n: usize) -> Result<Tensor> {
    let mut shape = like.dims().to_vec();
    shape[0] = n;
    Tensor::zeros(shape, like.dtype(), like.device())
}

/// Pad a tangent with zero channels up to `t` (channels missing from one branch are zero).
pub fn pad_channels(dx: &Tensor, t: usize) -> Result<Tensor> {
    let have = dx.dim(0)?;
    if have >= t {
        return Ok(dx.clone());
    }
    Tensor::cat(&[dx.clone(), zeros_channels(dx, t - have)?], 0)
}

/// Sum of two tangents whose channel counts may differ (a residual add of two branches).
pub fn add_tangents(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let t = a.dim(0)?.max(b.dim(0)?);
    pad_channels(a, t)? + pad_channels(b, t)?
}
