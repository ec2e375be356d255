//! The Lie derivative of a network (paper section 4): forward-mode JVP through every layer,
//! the local equivariance error (LEE, Eq. 4), and its layerwise decomposition (Eq. 6).

pub mod jvp;

pub use jvp::{
    add_tangents, merge_tangent, pad_channels, split_tangent, tangent_mul, Jvp, Repr, StepKind, StepRecord, Tape,
};
