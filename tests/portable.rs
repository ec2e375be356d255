//! `runtime.kernels = "portable"` (`kernels::set_portable`): the CPU runs the portable forms that
//! CUDA and f16 / bf16 run (`kernels::lean`: LayerNorm, softmax, attention, linear; one graph node per op, forward by candle's kernels,
//! backward written from candle ops), so the GPU path's graph can be measured here. Oracle: the
//! composed, differentiable candle forms (candle's autograd) for values and gradients. The switch
//! is process-wide, so this file is its own test binary with a single test.
//!
//! Tolerances: in f64 the forms differ by summation order only (1e-12), except GELU, whose
//! backward in candle rounds 1/√(2π) to 0.398942 (~1e-6 relative on its share of a gradient).
//! In f32, a few ulps of O(1) values: 2e-6.

mod common;

use candle_core::{DType, Tensor, Var};
use liederiv::kernels;

fn randn(shape: &[usize], scale: f64, seed: u64, dtype: DType) -> Tensor {
    common::randn(shape, scale, dtype, &mut common::rng(seed))
}

/// Values and gradients (w.r.t. every var, of Σ y ⊙ r for a fixed random r) of `f` under the
/// current kernel mode.
fn run(f: &dyn Fn(&[Tensor]) -> Tensor, vars: &[Var]) -> (Tensor, Vec<Tensor>) {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = randn(y.dims(), 1.0, 99, y.dtype());
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
    (y.detach(), g)
}

fn check(
    name: &str,
    lean: &dyn Fn(&[Tensor]) -> Tensor,
    composed: &dyn Fn(&[Tensor]) -> Tensor,
    vars: &[Var],
    tol: f64,
) {
    kernels::set_portable(true);
    assert!(!kernels::fusable(vars[0].as_tensor()));
    let (y, g) = run(lean, vars);
    kernels::set_portable(false);
    let (y_want, g_want) = run(composed, vars);
    let err = common::max_abs_diff(&y, &y_want);
    assert!(err <= tol, "{name}: values differ by {err:.2e}");
    for (i, (a, b)) in g.iter().zip(&g_want).enumerate() {
        let err = common::rel_err(a, b);
        assert!(err <= tol, "{name}: gradient {i} differs by {err:.2e} (relative)");
    }
}

fn checkpointed_vit_matches_plain() {
    use candle_core::Device;
    use liederiv::models::{build_with, Rng};
    use rand::SeedableRng;
    let cfg = common::tiny_vit_config(48, &["model.vit.heads=3", "model.vit.drop_path=0.3"]);
    let varmap = candle_nn::VarMap::new();
    let plain = build_with(&cfg, &varmap, DType::F32, &Device::Cpu).unwrap();
    let mut ckpt = build_with(&cfg, &varmap, DType::F32, &Device::Cpu).unwrap();
    ckpt.set_grad_checkpointing(true).unwrap();
    let x = common::blob_images(4, 1, 28, 3, DType::F32, &mut common::rng(11));
    let y = Tensor::from_vec(vec![1u32, 4, 7, 9], 4, &Device::Cpu).unwrap();
    let loss = |m: &dyn liederiv::models::Model| {
        let logits = m.forward_train(&x, &mut Rng::seed_from_u64(5)).unwrap();
        candle_nn::loss::cross_entropy(&logits, &y).unwrap()
    };
    let g1 = loss(plain.as_ref()).backward().unwrap();
    let g2 = kernels::checkpoint::backward(&loss(ckpt.as_ref())).unwrap();
    for (name, v) in common::named_vars(&varmap) {
        let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
        let err = common::rel_err(b, a);
        assert!(
            err <= 1e-6,
            "portable, checkpointed: {name}'s gradient differs by {err:.2e}"
        );
    }
}

#[test]
fn portable_forms_match_candle_autograd_and_the_config_names_them() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let var = |shape: &[usize], scale: f64, seed: u64| Var::from_tensor(&randn(shape, scale, seed, dtype)).unwrap();
        let ln = [var(&[4, 50, 64], 2.0, 1), var(&[64], 0.5, 2), var(&[64], 0.5, 3)];
        check(
            "layer_norm",
            &|t| kernels::layer_norm(&t[0], &(&t[1] + 1.0).unwrap(), &t[2], 1e-6).unwrap(),
            &|t| kernels::layer_norm_composed(&t[0], &(&t[1] + 1.0).unwrap(), &t[2], 1e-6).unwrap(),
            &ln,
            tol,
        );
        let s = [var(&[6, 50, 50], 3.0, 4)];
        check(
            "softmax",
            &|t| kernels::softmax(&t[0]).unwrap(),
            &|t| kernels::softmax_composed(&t[0]).unwrap(),
            &s,
            tol,
        );
        // 20 images: the backward runs in three chunks (of 8, 8 and 4 images).
        let qkv = [var(&[20, 17, 3 * 32], 1.0, 5)];
        check(
            "attention",
            &|t| kernels::attention(&t[0], 4, 0.125).unwrap(),
            &|t| kernels::attention_composed(&t[0], 4, 0.125).unwrap(),
            &qkv,
            tol,
        );
        let lin = [var(&[4, 50, 64], 1.0, 7), var(&[96, 64], 0.2, 8), var(&[96], 0.5, 9)];
        check(
            "linear",
            &|t| kernels::linear(&t[0], &t[1], Some(&t[2])).unwrap(),
            &|t| kernels::linear_composed(&t[0], &t[1], Some(&t[2])).unwrap(),
            &lin,
            tol,
        );
        check(
            "linear without bias",
            &|t| kernels::linear(&t[0], &t[1], None).unwrap(),
            &|t| kernels::linear_composed(&t[0], &t[1], None).unwrap(),
            &lin[..2],
            tol,
        );
        let res = [
            lin[0].clone(),
            lin[1].clone(),
            lin[2].clone(),
            var(&[4, 50, 96], 1.0, 10),
        ];
        check(
            "linear + residual",
            &|t| kernels::linear_add(&t[0], &t[1], Some(&t[2]), &t[3]).unwrap(),
            &|t| (kernels::linear_composed(&t[0], &t[1], Some(&t[2])).unwrap() + &t[3]).unwrap(),
            &res,
            tol,
        );
        let mlp = [
            var(&[20, 17, 96], 2.0, 11), // 20 images: the backward runs in chunks
            var(&[64, 96], 0.2, 12),
            var(&[64], 0.5, 13),
            var(&[20, 17, 64], 1.0, 14),
        ];
        check(
            "gelu + linear + residual",
            &|t| kernels::gelu_linear_add(&t[0], &t[1], Some(&t[2]), &t[3]).unwrap(),
            &|t| {
                let a = kernels::gelu_erf_composed(&t[0]).unwrap();
                (kernels::linear_composed(&a, &t[1], Some(&t[2])).unwrap() + &t[3]).unwrap()
            },
            &mlp,
            tol.max(2e-6),
        );
        let g = [var(&[20, 50, 96], 2.0, 6)]; // 20 images: the backward runs in chunks
        check(
            "gelu",
            &|t| kernels::gelu_erf(&t[0]).unwrap(),
            &|t| kernels::gelu_erf_composed(&t[0]).unwrap(),
            &g,
            tol.max(2e-6),
        );
        // The graph the fused kernels build differs from the portable one to the bit, so the
        // comparisons above did run the portable forms.
        kernels::set_portable(true);
        let lean = kernels::layer_norm(ln[0].as_tensor(), ln[1].as_tensor(), ln[2].as_tensor(), 1e-6).unwrap();
        kernels::set_portable(false);
        let fused = kernels::layer_norm(ln[0].as_tensor(), ln[1].as_tensor(), ln[2].as_tensor(), 1e-6).unwrap();
        assert!(kernels::fusable(ln[0].as_tensor()));
        assert!(common::max_abs_diff(&lean, &fused) > 0.0, "{dtype:?}");
    }

    // Gradient checkpointing on the portable path (what CUDA trains with): a ViT with drop path,
    // every block one checkpointed node, gives the plain portable step's gradients.
    kernels::set_portable(true);
    checkpointed_vit_matches_plain();
    kernels::set_portable(false);

    // The config key: parsed once, unknown values refused naming the key and the choices.
    let cfg = liederiv::Config::resolve_str("", "<test>", &["runtime.kernels=\"portable\"".into()]).unwrap();
    assert_eq!(cfg.runtime.kernels, liederiv::config::Kernels::Portable);
    assert_eq!(
        liederiv::Config::default().runtime.kernels,
        liederiv::config::Kernels::Fused
    );
    let err = liederiv::Config::resolve_str("", "<test>", &["runtime.kernels=\"fast\"".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("runtime.kernels") && err.contains("portable"), "{err}");
}
