//! CPU kernels: every op whose candle composition was too slow or cut the gradient, as one
//! candle `CustomOp` each, with its backward and (for the JVP) its tangent kernel. Below the JVP
//! contract and the models: kernels know tensors, not layers.
//!
//! The row-wise kernels ([`layer_norm`], [`softmax`], [`gelu`]): fused CPU kernels, with a backward, for the three row-wise ops that dominate a small ViT's
//! training step once the matmuls are fast: LayerNorm over the last axis, softmax over the last
//! axis and the exact (erf) GELU.
//!
//! Written from candle ops (as `layers.rs` must, because candle-nn's fused LayerNorm / softmax
//! have no backward), each of these is 4–8 elementwise/reduction kernels forward and 2–3× that
//! backward, each allocating a full-size temporary. Here each is one candle `CustomOp` whose
//! forward is one pass over the rows, split across the rayon pool, and whose `bwd` is a second
//! `CustomOp` of the same kind (timm / PyTorch compute the same formulas in their fused kernels).
//! The ops are exact rewrites: the tests (`tests/fused.rs`) hold them to the composed versions
//! and to f64 finite differences.
//!
//! The JVPs of LayerNorm and GELU (`*_jvp`, used by the LEE metric) have fused tangent kernels
//! without a backward; they run only when no operand tracks a gradient, and the composed,
//! differentiable JVP otherwise (LEE-penalised training differentiates it).
//!
//! On other devices or dtypes (CUDA, f16/bf16), and on the CPU under `runtime.kernels =
//! "portable"`, the public functions run the portable forms of [`lean`] (one graph node each,
//! keeping only what its backward needs; candle's kernels where they exist), so callers never
//! need to branch. Second derivatives through the fused
//! backward are not supported and fail loudly (`BackwardNotSupported`) rather than being cut.
//!
//! Files: [`fastmath`] (the float types, f32 exp / erf), [`driver`] (the row-parallel and gemm
//! drivers every kernel shares), [`layer_norm`], [`softmax`], [`gelu`], [`attention`] (fused
//! scaled-dot-product attention), [`linear`] (fused linear layer), [`im2col`] (convolution as
//! one matmul), [`depthwise`] (depthwise convolution), [`tangent`] (the tangent layout), [`simd`] (gemm's instruction set), [`lean`] (the portable forms, lean on every device), [`checkpoint`] (gradient checkpointing: a
//! segment as one node that keeps only its input).

pub mod attention;
pub mod checkpoint;
pub mod depthwise;
mod driver;
mod fastmath;
pub mod gelu;
pub mod im2col;
pub mod layer_norm;
mod lean;
pub mod linear;
mod simd;
pub mod softmax;
pub mod tangent;

pub use attention::{attention, attention_composed, attention_jvp, attention_jvp_composed, merge_heads, split_heads};
pub use depthwise::{depthwise_conv2d, depthwise_conv2d_composed};
pub use driver::{fusable, set_portable};
pub use gelu::{gelu_erf, gelu_erf_composed, gelu_erf_derivative, gelu_erf_derivative_composed, gelu_erf_jvp};
pub use layer_norm::{layer_norm, layer_norm_composed, layer_norm_jvp, layer_norm_jvp_composed};
pub use lean::at_least_f32;
pub use linear::{gelu_linear_add, linear, linear_add, linear_composed};
pub use simd::{avx512, isa};
pub use softmax::{softmax, softmax_composed, softmax_tangent};
pub use tangent::{merge_tangent, split_tangent, tangent_matmul, tangent_mul};
