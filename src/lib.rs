//! liederiv: fine-tune vision transformers and equivariant CNNs on rotated MNIST and measure how
//! equivariant they are with the Lie derivative ("The Lie Derivative for Measuring Learned
//! Equivariance", Gruver, Finzi, Goldblum, Wilson, ICLR 2023).
//!
//! Module map (paper ↔ code): `transforms` (finite warps, generators, stencils), `lie` (JVP, LEE,
//! layerwise decomposition, other metrics), `models` (ViT, MAE, CNN, G-CNN, weight loading),
//! `data` (MNIST, MNIST-rot, OOD sets, loader), `train` (loop, optimiser, schedule,
//! augmentation, checkpoints), `report` (logs, tables, plots), `config`, `cli`, `runtime`
//! (process-wide allocator settings for CPU speed).

pub mod cli;
pub mod config;
pub mod data;
pub mod hub;
pub mod lie;
pub mod models;
pub mod report;
pub mod runtime;
pub mod train;
pub mod transforms;

pub use config::Config;
