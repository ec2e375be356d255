//! The model zoo of Table 1: our ViT (and its MAE pretraining wrapper), a ResNet-style CNN and a
//! C_N group-equivariant CNN. Models know nothing of the trainer; every model implements the
//! forward + [`Jvp`] contract that the LEE code needs.

use crate::lie::Jvp;
use candle_core::{Result, Tensor};

/// The seeded RNG threaded through everything random in training (dropout, drop path, masking).
pub type Rng = rand_chacha::ChaCha8Rng;

/// A classifier: images `(B, C, H, W)` → logits `(B, K)`.
pub trait Model: Jvp {
    /// Eval-mode logits (no dropout / drop path, batch norm with running statistics).
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Training-mode logits (drop path, batch statistics; running statistics are updated).
    fn forward_train(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor>;
}

pub mod init;
