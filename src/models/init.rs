//! Seeded parameter initialisation. candle's CPU device cannot be seeded (`set_seed` bails), so
//! a model built on a plain `VarMap` gets different weights every run. This backend keeps
//! candle-nn's `Init` hints (Kaiming, normal, uniform, constants) but draws the values from a
//! ChaCha8 stream keyed by (seed, parameter name): the same config gives the same weights, in
//! any construction order. Tensors already in the map (pretrained weights) are used as they are.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder, VarMap};
use rand::{Rng as _, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A `VarMap` whose missing variables are initialised from a seeded stream.
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, seed }
    }

    /// A VarBuilder that creates (or reuses) the variables of `varmap`.
    pub fn var_builder(varmap: &VarMap, seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(SeededVarMap::new(varmap.clone(), seed)), dtype, device.clone())
    }
}

/// FNV-1a of the name: a stable per-parameter stream id.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn sample(init: Init, shape: &Shape, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f64> {
    let n = shape.elem_count();
    let normal = |rng: &mut rand_chacha::ChaCha8Rng, mean: f64, std: f64| -> Vec<f64> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                mean + std * z
            })
            .collect()
    };
    let uniform = |rng: &mut rand_chacha::ChaCha8Rng, lo: f64, up: f64| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * rng.random::<f64>()).collect()
    };
    match init {
        Init::Const(c) => vec![c; n],
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(rng, -bound, bound)
                }
                candle_nn::init::NormalOrUniform::Normal => normal(rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if self.varmap.data().lock().is_ok_and(|d| d.contains_key(name)) {
            return self.varmap.get(s, name, h, dtype, dev);
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ name_hash(name));
        let values = sample(h, &s, &mut rng);
        let var = Var::from_tensor(&Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        match self.varmap.data().lock() {
            Ok(mut d) => d.insert(name.to_string(), var),
            Err(_) => candle_core::bail!("variable map lock poisoned while creating {name}"),
        };
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("parameter {name} must be created with a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().is_ok_and(|d| d.contains_key(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> (Tensor, Tensor) {
        let vm = VarMap::new();
        let vb = SeededVarMap::var_builder(&vm, seed, DType::F32, &Device::Cpu);
        let w = candle_nn::linear(8, 4, vb.pp("fc"))
            .map(|l| l.weight().clone())
            .unwrap();
        let e = vb
            .get_with_hints((3, 3), "emb", Init::Randn { mean: 0.0, stdev: 0.02 })
            .unwrap();
        (w, e)
    }

    #[test]
    fn same_seed_same_weights_other_seed_different() {
        let (a, e1) = build(7);
        let (b, e2) = build(7);
        let (c, _) = build(8);
        let diff = |x: &Tensor, y: &Tensor| {
            (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&a, &b), 0.0);
        assert_eq!(diff(&e1, &e2), 0.0);
        assert!(diff(&a, &c) > 0.0);
        // The hints are honoured: a uniform init stays inside its bounds and is not constant.
        let vm = VarMap::new();
        let vb = SeededVarMap::var_builder(&vm, 1, DType::F32, &Device::Cpu);
        let u = vb
            .get_with_hints(1000, "u", Init::Uniform { lo: -0.5, up: 0.25 })
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(u.iter().all(|v| (-0.5..0.25).contains(v)));
        let mean = u.iter().sum::<f32>() / 1000.0;
        assert!((mean + 0.125).abs() < 0.02, "{mean}");
    }
}
