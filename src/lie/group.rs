//! Equivariance of hidden layers under the discrete rotation group C_N (`--metrics group`):
//! for every g ≠ e of C_N and every step l of the network, per image
//! ‖f_l(g·x) − ρ_l(g)·f_l(x)‖ / ‖f_l(x)‖, the check escnn's `check_equivariance` makes, here
//! per layer and on real data.
//!
//! g = the rotation by 2πk/N about the image centre, applied to the input with the warp of
//! `crate::transforms` (grid points only, so an exact pixel permutation, for multiples of 90°;
//! bilinear otherwise; outside the frame the fill is the normalised black pixel). ρ_l(g) is how
//! g acts on step l's output: a feature map `(B, C, H, W)` is rotated the same way (zero fill);
//! a C_N group feature map `(B, C, N, H, W)` is rotated and its orientation axis rolled by k;
//! invariant outputs (pooled features, logits) are left alone. A model with group feature maps
//! (the G-CNN, [`Model::group_order`]) is measured at every step; any other (ViT, CNN, a
//! rotation-averaged model) at its output only, under C4, where ρ is the identity: the
//! invariance form.

use super::lee::MeanStderr;
use crate::jvp::{Repr, Tape};
use crate::models::Model;
use crate::transforms::{apply, Blank, Padding, Transform};
use candle_core::{DType, Result, Tensor};

/// The group a model without group feature maps is checked under (exact pixel rotations).
pub const OUTPUT_ONLY_ORDER: usize = 4;

/// One step's errors, one per non-identity group element.
#[derive(Clone, Debug)]
pub struct GroupLayer {
    pub name: String,
    pub errors: Vec<MeanStderr>,
}

/// What `--metrics group` measured on a split.
#[derive(Clone, Debug)]
pub struct GroupReport {
    /// N of C_N.
    pub order: usize,
    /// The angles of g = 1 … N−1, in degrees.
    pub angles_deg: Vec<f64>,
    /// In network order; the last is the output (logits).
    pub layers: Vec<GroupLayer>,
}

/// Accumulates the per-layer errors over the batches of a split.
#[derive(Clone, Debug)]
pub struct GroupAccumulator {
    /// The normalised value of a black pixel: the fill of a rotated input.
    background: Blank,
    order: Option<usize>,
    layers: Vec<GroupLayer>,
}

/// Rotate the grid (last two axes) of `y` by `theta`; outside the frame, zero, or the input's
/// blank pixel (`fill`, channels on axis 1).
fn rotate(y: &Tensor, theta: f64, fill: Option<&Blank>) -> Result<Tensor> {
    let dims = y.dims().to_vec();
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let zero_filled = |y: &Tensor| {
        let flat = y.reshape(((), 1, h, w))?;
        let b = flat.dim(0)?;
        apply(&flat, Transform::Rotate, &vec![theta; b], Padding::Zeros)?.reshape(dims.as_slice())
    };
    match fill {
        Some(blank) => blank.around(y, zero_filled),
        None => zero_filled(y),
    }
}

/// ρ(g_k) on a step's output; `None` where the group has no action (tokens).
fn act(y: &Tensor, repr: Repr, theta: f64, k: usize) -> Result<Option<Tensor>> {
    Ok(match repr {
        Repr::Invariant => Some(y.clone()),
        Repr::Image => Some(rotate(y, theta, None)?),
        // The lifting conv's channel r holds the filter rotated by r steps, so rotating the input
        // by k steps moves channel r's response to channel r + k.
        Repr::Group => Some(rotate(y, theta, None)?.roll(k as i32, 2)?),
        Repr::Tokens { .. } => None,
    })
}

/// Per image ‖moved − expected‖ / ‖base‖ over all but the first axis (`base` = f(x): at angles
/// off the pixel grid the rotated map loses its corners, so its own norm is not the scale).
fn relative_errors(moved: &Tensor, expected: &Tensor, base: &Tensor) -> Result<Vec<f64>> {
    let n = base.dim(0)?;
    let flat = |t: &Tensor| t.reshape((n, ()));
    let num = (flat(moved)? - flat(expected)?)?.sqr()?.sum(1)?.sqrt()?;
    let den = flat(base)?.sqr()?.sum(1)?.sqrt()?;
    num.div(&den)?.to_dtype(DType::F64)?.to_vec1()
}

impl GroupAccumulator {
    pub fn new(background: Blank) -> Self {
        Self {
            background,
            order: None,
            layers: Vec::new(),
        }
    }

    /// The steps of `model` on `x` with their representations: every step of a model with group
    /// feature maps (a JVP in capture mode, with a zero tangent), else the output alone.
    fn steps(model: &dyn Model, x: &Tensor, per_layer: bool) -> Result<Vec<(String, Repr, Tensor)>> {
        if !per_layer {
            return Ok(vec![("output".into(), Repr::Invariant, model.forward(x)?)]);
        }
        let mut tape = Tape::capture();
        let dx = x.zeros_like()?.unsqueeze(0)?;
        model.jvp(x, &dx, &mut tape)?;
        Ok(tape
            .captured()
            .iter()
            .map(|c| (c.name.clone(), c.repr, c.y.clone()))
            .collect())
    }

    /// Measure one batch `x: (B, C, H, W)` (normalised).
    pub fn push(&mut self, model: &dyn Model, x: &Tensor) -> Result<()> {
        let group = model.group_order();
        let n = group.unwrap_or(OUTPUT_ONLY_ORDER);
        let base = Self::steps(model, x, group.is_some())?;
        if self.layers.is_empty() {
            self.order = Some(n);
            self.layers = base
                .iter()
                .filter(|(_, repr, _)| !matches!(repr, Repr::Tokens { .. }))
                .map(|(name, _, _)| GroupLayer {
                    name: name.clone(),
                    errors: vec![MeanStderr::new(); n - 1],
                })
                .collect();
        }
        for k in 1..n {
            let theta = std::f64::consts::TAU * k as f64 / n as f64;
            let moved = Self::steps(model, &rotate(x, theta, Some(&self.background))?, group.is_some())?;
            let mut layer = self.layers.iter_mut();
            for ((name, repr, y), (_, _, y_g)) in base.iter().zip(&moved) {
                let Some(expected) = act(y, *repr, theta, k)? else {
                    continue;
                };
                let l = layer
                    .next()
                    .filter(|l| &l.name == name)
                    .ok_or_else(|| candle_core::Error::Msg(format!("group metric: step {name} was not seen before")))?;
                l.errors[k - 1].extend(relative_errors(y_g, &expected, y)?);
            }
        }
        Ok(())
    }

    pub fn finish(self) -> GroupReport {
        let order = self.order.unwrap_or(OUTPUT_ONLY_ORDER);
        GroupReport {
            order,
            angles_deg: (1..order).map(|k| 360.0 * k as f64 / order as f64).collect(),
            layers: self.layers,
        }
    }
}
