//! Gradient checkpointing (activation recomputation, Chen et al. 2016; timm's
//! `set_grad_checkpointing`, PyTorch's `torch.utils.checkpoint`): `y = f(x)` as ONE autograd node
//! that keeps only its input. The forward runs `f` and drops every intermediate at once; the
//! backward runs `f` again on the saved input with its graph, back-propagates the incoming
//! gradient through it and frees it, so at most one checkpointed segment's activations are alive.
//!
//! candle's custom ops return gradients for their tensor arguments only, and `f`'s weights are not
//! arguments: the backward hands their gradients to the enclosing [`backward`], which adds them to
//! the `GradStore` it returns. A checkpointed graph must therefore be differentiated with
//! [`backward`] instead of `Tensor::backward` (the node refuses otherwise: its weights' gradients
//! would be lost). `f` must compute the same values when called again — callers replay the random
//! draws (drop path) it made the first time.

use super::lean::{hand_over, Precomputed};
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};
use std::cell::RefCell;

/// A segment's recomputation: the same function, on a graph-tracking copy of its input.
pub type Recompute = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// The weight gradients the checkpointed backwards of the current [`backward`] produced.
    static WEIGHT_GRADS: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// `y = first(x)`, attached to the graph as one node that keeps only `x`; its backward calls
/// `again(x)` (which must compute what `first` did) to rebuild the segment's graph. When `x`
/// tracks no gradient this is just `first(x)`: nothing would be differentiated.
pub fn checkpoint(x: &Tensor, first: impl FnOnce(&Tensor) -> Result<Tensor>, again: Recompute) -> Result<Tensor> {
    if !x.track_op() {
        return first(x);
    }
    // The forward's own graph (through the weights) dies with `y` at the end of this function.
    let y = first(&x.detach())?.contiguous()?;
    x.apply_op1(Checkpoint {
        out: Precomputed::new(y.detach()),
        again,
    })
}

/// `loss.backward()` for a graph that may hold [`checkpoint`] nodes: their weights' gradients are
/// added to the store (summed with any the rest of the graph gave the same weights).
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let previous = WEIGHT_GRADS.with(|w| w.borrow_mut().replace(Vec::new()));
    let grads = loss.backward();
    let collected = WEIGHT_GRADS.with(|w| std::mem::replace(&mut *w.borrow_mut(), previous));
    let mut grads = grads?;
    for (weight, g) in collected.unwrap_or_default() {
        let sum = match grads.remove(&weight) {
            Some(a) => (a + g)?,
            None => g,
        };
        grads.insert(&weight, sum);
    }
    Ok(grads)
}

struct Checkpoint {
    out: Precomputed,
    again: Recompute,
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    hand_over!(CustomOp1);

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if WEIGHT_GRADS.with(|w| w.borrow().is_none()) {
            bail!(
                "a checkpointed segment was differentiated by Tensor::backward, which would lose its weights' \
                 gradients: use kernels::checkpoint::backward"
            )
        }
        let x = Var::from_tensor(&x.detach())?;
        let y = (self.again)(x.as_tensor())?;
        // d/dθ Σ y·g = gᵀ ∂y/∂θ: the vector-Jacobian product the outer backward asks for.
        let weights: Vec<Tensor> = y
            .sorted_nodes()
            .into_iter()
            .filter(|t| t.is_variable() && t.id() != x.as_tensor().id())
            .cloned()
            .collect();
        let mut grads = (&y * g.detach())?.sum_all()?.backward()?;
        let dx = grads.remove(x.as_tensor());
        let found: Vec<(Tensor, Tensor)> = weights
            .into_iter()
            .filter_map(|w| grads.remove(&w).map(|gw| (w, gw.detach())))
            .collect();
        WEIGHT_GRADS.with(|w| {
            if let Some(sink) = w.borrow_mut().as_mut() {
                sink.extend(found);
            }
        });
        Ok(dx.map(|d| d.detach()))
    }
}
