//! One binary, two instruction sets: gemm's AVX-512 micro-kernels (`kernels::simd`) against the
//! AVX2+FMA ones that `LIEDERIV_AVX512=0` forces. Each path runs
//! in its own child process (the choice is made once per process): a ViT forward, the gradient
//! of its loss, and the tangent of its softmax along an input direction, in f32. They must agree
//! within rounding: the two gemm kernel sets add the products of a dot product in different
//! orders (f32 rounding, ~1e-7 relative per sum), nothing else differs.

mod common;

use candle_core::{DType, Device, Tensor};
use liederiv::jvp::Tape;
use liederiv::lie::lee::softmax_jvp;
use liederiv::models::{build_model, frozen, Rng};
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::Path;

/// The child's side: compute and save the tensors (and the instruction set in use) to `out`.
fn compute(out: &Path) {
    let cfg = common::tiny_vit_config(64, &["model.vit.pool=\"mean\""]);
    let dev = Device::Cpu;
    let (varmap, model) = build_model(&cfg, &dev).unwrap();
    let x = common::randn(&[16, 1, 28, 28], 1.0, DType::F32, &mut common::rng(1));
    let dx = common::randn(&[1, 16, 1, 28, 28], 1.0, DType::F32, &mut common::rng(2));
    let labels = Tensor::from_vec((0..16u32).map(|i| i % 10).collect::<Vec<_>>(), 16, &dev).unwrap();
    let logits = model.forward_train(&x, &mut Rng::seed_from_u64(0)).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    let mut saved: HashMap<String, Tensor> = HashMap::new();
    saved.insert("logits".into(), logits.detach());
    for (name, var) in varmap.data().lock().unwrap().iter() {
        saved.insert(format!("grad.{name}"), grads.get(var.as_tensor()).unwrap().clone());
    }
    let inference = frozen(&cfg, &varmap, &dev).unwrap();
    let (l, dl) = inference.jvp(&x, &dx, &mut Tape::off()).unwrap();
    saved.insert("dprobs".into(), softmax_jvp(&l, &dl).unwrap().1);
    candle_core::safetensors::save(&saved, out).unwrap();
    std::fs::write(out.with_extension("isa"), liederiv::kernels::isa()).unwrap();
}

/// Run this test in a child process with `LIEDERIV_AVX512` set to `avx512` (or unset).
fn child(dir: &Path, avx512: Option<&str>) -> (HashMap<String, Tensor>, String) {
    let out = dir.join(format!("{}.safetensors", avx512.unwrap_or("default")));
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "avx2_and_avx512_paths_agree", "--nocapture"])
        .env("LIEDERIV_ISA_TEST_OUT", &out)
        .env_remove("LIEDERIV_AVX512");
    if let Some(v) = avx512 {
        cmd.env("LIEDERIV_AVX512", v);
    }
    let status = cmd.status().unwrap();
    assert!(status.success(), "child with LIEDERIV_AVX512={avx512:?} failed");
    let tensors = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    (tensors, std::fs::read_to_string(out.with_extension("isa")).unwrap())
}

#[test]
fn avx2_and_avx512_paths_agree() {
    if let Ok(out) = std::env::var("LIEDERIV_ISA_TEST_OUT") {
        compute(Path::new(&out));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (avx2, isa2) = child(dir.path(), Some("0"));
    let (wide, isa) = child(dir.path(), None);
    assert_eq!(isa2, "avx2");
    // Without AVX-512 (an AVX2-only CPU) both children run the same kernels: equal to the bit.
    let has_avx512 = std::arch::is_x86_feature_detected!("avx512f");
    assert_eq!(isa, if has_avx512 { "avx512" } else { "avx2" });
    assert_eq!(avx2.len(), wide.len());
    let mut worst = (0.0f64, String::new());
    for (name, a) in &avx2 {
        let b = &wide[name];
        let err = common::rel_err(b, a);
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!("{isa} vs avx2: worst relative difference {:.2e} ({})", worst.0, worst.1);
    let tol = if has_avx512 { 1e-5 } else { 0.0 };
    assert!(
        worst.0 <= tol,
        "{isa} vs avx2: {} differs by {:.2e} (relative)",
        worst.1,
        worst.0
    );
}
