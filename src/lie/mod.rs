//! The Lie derivative of a network (paper section 4): forward-mode JVP through every layer,
//! the local equivariance error (LEE, Eq. 4), and its layerwise decomposition (Eq. 6).

pub mod jvp;
pub mod layerwise;
pub mod lee;
pub mod metrics;

pub use jvp::{
    add_tangents, merge_tangent, pad_channels, split_tangent, tangent_mul, Jvp, Repr, StepKind, StepRecord, Tape,
};
pub use layerwise::{
    decompose, exact_sq_norms, hutchinson_sq_norms, layerwise_split, Decomposition, LayerwiseAccumulator,
    LayerwiseReport, StepContribution,
};
pub use lee::{
    input_tangents, lee_penalty, lee_per_image, lee_split, output_lie_derivative, reduce_statistic, softmax_jvp,
    LeeSpec, LeeSummary, MeanStderr, Statistic,
};
