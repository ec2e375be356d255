//! The Lie derivative of a network (paper section 4) on any model that implements the forward +
//! [`crate::jvp::Jvp`] contract: the local equivariance error (LEE, Eq. 4), its layerwise
//! decomposition (Eq. 6), and the alternative metrics.

pub mod group;
pub mod layerwise;
pub mod lee;
pub mod metrics;

pub use group::{GroupAccumulator, GroupLayer, GroupReport};
pub use layerwise::{
    decompose, exact_sq_norms, hutchinson_sq_norms, layerwise_split, Decomposition, LayerwiseAccumulator,
    LayerwiseReport, StepContribution,
};
pub use lee::{
    input_tangents, lee_penalty, lee_per_image, lee_split, output_lie_derivative, readout, reduce_statistic,
    softmax_jvp, LeeAccumulator, LeeEntry, LeeOutput, LeeSpec, LeeSummary, MeanStderr, OutputDerivative, Statistic,
};
pub use metrics::{
    lanczos_warp, metric_per_image, metrics_split, roll, Metric, MetricStat, MetricsAccumulator, Output,
};
