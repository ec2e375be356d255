//! `runtime.kernels = "portable"` (`kernels::set_portable`): the CPU runs the composed ops that
//! CUDA and f16 / bf16 run, so the GPU path's graph can be measured here. The switch is
//! process-wide, so this file is its own test binary with a single test.

mod common;

use candle_core::{DType, Var};
use liederiv::kernels;

#[test]
fn portable_runs_the_composed_ops_and_the_config_names_it() {
    let x = Var::from_tensor(&common::randn(&[4, 50, 64], 2.0, DType::F32, &mut common::rng(1))).unwrap();
    let w = common::randn(&[64], 0.5, DType::F32, &mut common::rng(2)).affine(1.0, 1.0).unwrap();
    let b = common::randn(&[64], 0.5, DType::F32, &mut common::rng(3));
    let ops = |x: &candle_core::Tensor| {
        let y = kernels::layer_norm(x, &w, &b, 1e-6).unwrap();
        kernels::gelu_erf(&kernels::softmax(&y).unwrap()).unwrap()
    };
    let composed = |x: &candle_core::Tensor| {
        let y = kernels::layer_norm_composed(x, &w, &b, 1e-6).unwrap();
        kernels::gelu_erf_composed(&kernels::softmax_composed(&y).unwrap()).unwrap()
    };
    let want = composed(&x);
    let fused = ops(&x);
    // Fused and composed round differently, so bit equality below says which one ran.
    assert!(common::max_abs_diff(&fused, &want) > 0.0);
    assert!(kernels::fusable(&x));

    kernels::set_portable(true);
    assert!(!kernels::fusable(&x));
    let portable = ops(&x);
    assert_eq!(common::max_abs_diff(&portable, &want), 0.0);
    // The portable forms are differentiable candle ops: the gradient flows as the composed one.
    let g = portable.sum_all().unwrap().backward().unwrap();
    let g_want = want.sum_all().unwrap().backward().unwrap();
    let (ga, gb) = (g.get(x.as_tensor()).unwrap(), g_want.get(x.as_tensor()).unwrap());
    assert_eq!(common::max_abs_diff(ga, gb), 0.0);
    kernels::set_portable(false);
    assert!(kernels::fusable(&x));

    // The config key: parsed once, unknown values refused naming the key and the choices.
    let cfg = liederiv::Config::resolve_str("", "<test>", &["runtime.kernels=\"portable\"".into()]).unwrap();
    assert_eq!(cfg.runtime.kernels, liederiv::config::Kernels::Portable);
    assert_eq!(liederiv::Config::default().runtime.kernels, liederiv::config::Kernels::Fused);
    let err = liederiv::Config::resolve_str("", "<test>", &["runtime.kernels=\"fast\"".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("runtime.kernels") && err.contains("portable"), "{err}");
}
