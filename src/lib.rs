//! liederiv: fine-tune vision transformers and equivariant CNNs on rotated MNIST and measure how
//! equivariant they are with the Lie derivative ("The Lie Derivative for Measuring Learned
//! Equivariance", Gruver, Finzi, Goldblum, Wilson, ICLR 2023).
//!
//! Layers, each importing only from the ones above it in this list (paper ↔ code):
//! - `runtime` (process settings, devices, atomic writes), `hub` (the Hugging Face Hub client),
//!   `progress` (bars at a terminal, line records in logs);
//! - `transforms` (finite warps, generators, stencils, how a transform acts on a tensor);
//! - `config` (the one typed config, validated once);
//! - `data` (MNIST, MNIST-rot, OOD sets, loader);
//! - `kernels` (fused CPU ops with their backward and tangent kernels);
//! - `jvp` (the forward-mode contract: `Jvp`, `Tape`, the tangent layout);
//! - `models` (ViT, MAE, CNN, G-CNN, weight loading);
//! - `lie` (LEE, layerwise decomposition, other metrics);
//! - `report` (the metrics record and its files, tables, plots, console formatting);
//! - `train` (loop, optimiser, schedule, augmentation, checkpoints, evaluation);
//! - `cli` (flags wired to the library).

pub mod cli;
pub mod config;
pub mod data;
pub mod hub;
pub mod jvp;
pub mod kernels;
pub mod lie;
pub mod models;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod train;
pub mod transforms;

pub use config::Config;
