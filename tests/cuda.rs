//! The CUDA backend against the CPU on the same weights (issue 9): LEE (forward-mode JVP), the
//! loss gradient of every parameter, the LEE-penalty gradient (backprop through the tangent), an
//! MAE pretraining loss gradient, AdamW steps and the finite warps. Compiled only with
//! `--features cuda` and run on a GPU machine (scripts/build_cuda.sh builds it, scripts/gpu_check.sh
//! runs it); without a GPU every test fails at `Device::new_cuda(0)`, it does not skip.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use liederiv::config::{Config, VitConfig};
use liederiv::lie::lee::{lee_penalty, lee_per_image, LeeOutput, Statistic};
use liederiv::models::mae::Mae;

use liederiv::models::{build_with, init::SeededVarMap, Model, Rng};
use liederiv::train::{AdamW, AdamWParams};
use liederiv::transforms::{apply, Padding, Stencil, Transform};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

const TOL: f64 = 1e-4;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU (run them on the GPU machine: scripts/gpu_check.sh)")
}

fn randn(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let mut rng = Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product())
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, dev)
}

/// max |a − b| / max(1, max |b|), both moved to the CPU in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
    Ok(diff / scale)
}

fn config(kind: &str) -> Config {
    let mut cfg = Config::default();
    cfg.model.kind = serde_json::from_value(serde_json::json!(kind)).unwrap();
    if kind == "vit" {
        cfg.model.vit = VitConfig::tiny_mnist();
    }
    cfg
}

/// The same seeded model on the CPU and on the GPU: the initialiser draws on the host, so the
/// weights are identical (checked).
fn pair(cfg: &Config) -> Result<(VarMap, Box<dyn Model>, VarMap, Box<dyn Model>)> {
    let (vc, vg) = (VarMap::new(), VarMap::new());
    let mc = build_with(cfg, &vc, DType::F32, &Device::Cpu)?;
    let mg = build_with(cfg, &vg, DType::F32, &gpu())?;
    let (c, g) = (vc.data().lock().unwrap(), vg.data().lock().unwrap());
    assert_eq!(c.len(), g.len());
    for (name, v) in c.iter() {
        assert_eq!(
            rel_err(g[name].as_tensor(), v.as_tensor())?,
            0.0,
            "{name} differs between devices"
        );
    }
    drop((c, g));
    Ok((vc, mc, vg, mg))
}

/// Worst relative gradient difference over all parameters of `loss_c` (CPU) and `loss_g` (GPU).
fn grad_err(vc: &VarMap, loss_c: &Tensor, vg: &VarMap, loss_g: &Tensor) -> Result<(f64, String)> {
    let (gc, gg) = (loss_c.backward()?, loss_g.backward()?);
    let (c, g) = (vc.data().lock().unwrap(), vg.data().lock().unwrap());
    let mut worst = (0.0, String::new());
    for (name, v) in c.iter() {
        // Batch-norm running statistics are buffers, updated by the forward pass, not trained.
        if name.contains("running_") {
            continue;
        }
        let a = gc
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no CPU gradient for {name}"));
        let b = gg
            .get(g[name].as_tensor())
            .unwrap_or_else(|| panic!("no GPU gradient for {name}"));
        let e = rel_err(b, a)?;
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    Ok(worst)
}

fn lee_and_grads(kind: &str) -> Result<()> {
    let cfg = config(kind);
    let (vc, mc, vg, mg) = pair(&cfg)?;
    let transforms = [Transform::Rotate, Transform::TranslateX, Transform::Scale];
    let xc = randn(&[8, 1, 28, 28], 1, &Device::Cpu)?;
    let xg = xc.to_device(&gpu())?;

    // LEE per image and transform, squared statistic on the probabilities.
    let lc = lee_per_image(
        mc.as_ref(),
        &xc,
        &transforms,
        Stencil::Central,
        Statistic::Sq,
        LeeOutput::Probs,
    )?;
    let lg = lee_per_image(
        mg.as_ref(),
        &xg,
        &transforms,
        Stencil::Central,
        Statistic::Sq,
        LeeOutput::Probs,
    )?;
    // Relative to the transform's largest LEE over the batch: an image whose LEE is 1e-3 of the
    // others' is a cancellation that float rounding may move by 1e-3 of itself (the CNN's was on
    // the H200: 1.03e-3 at 1.9e-5).
    let mut worst: f64 = 0.0;
    for (rc, rg) in lc.iter().zip(&lg) {
        let scale = rc.iter().fold(1e-12f64, |m, a| m.max(a.abs()));
        for (a, b) in rc.iter().zip(rg) {
            worst = worst.max((a - b).abs() / scale);
        }
    }
    println!(
        "{kind}: LEE cpu {:.6e} gpu {:.6e} (rotate, image 0); worst rel diff {worst:.2e}",
        lc[0][0], lg[0][0]
    );
    assert!(
        worst < TOL,
        "{kind}: LEE differs between CPU and GPU by {worst:e} (relative)"
    );

    // Cross-entropy gradient of every parameter.
    let labels: Vec<u32> = (0..8).map(|i| i % 10).collect();
    let yc = Tensor::new(labels.as_slice(), &Device::Cpu)?;
    let yg = yc.to_device(&gpu())?;
    let loss_c = candle_nn::loss::cross_entropy(&mc.forward(&xc)?, &yc)?;
    let loss_g = candle_nn::loss::cross_entropy(&mg.forward(&xg)?, &yg)?;
    let (e, name) = grad_err(&vc, &loss_c, &vg, &loss_g)?;
    println!(
        "{kind}: loss cpu {} gpu {}; worst gradient rel diff {e:.2e} ({name})",
        loss_c.to_scalar::<f32>()?,
        loss_g.to_scalar::<f32>()?
    );
    assert!(e < TOL, "{kind}: gradient of {name} differs by {e:e}");

    // Gradient of the LEE penalty: backprop through the tangent's ops.
    let pc = lee_penalty(mc.as_ref(), &xc, &transforms[..1], Stencil::Central, LeeOutput::Probs)?;
    let pg = lee_penalty(mg.as_ref(), &xg, &transforms[..1], Stencil::Central, LeeOutput::Probs)?;
    let (e, name) = grad_err(&vc, &pc, &vg, &pg)?;
    println!("{kind}: LEE penalty gradient worst rel diff {e:.2e} ({name})");
    assert!(e < TOL, "{kind}: LEE-penalty gradient of {name} differs by {e:e}");
    Ok(())
}

#[test]
fn vit_lee_and_gradients_match_cpu() -> Result<()> {
    lee_and_grads("vit")
}

#[test]
fn cnn_lee_and_gradients_match_cpu() -> Result<()> {
    lee_and_grads("cnn")
}

#[test]
fn gcnn_lee_and_gradients_match_cpu() -> Result<()> {
    lee_and_grads("gcnn")
}

#[test]
fn mae_loss_gradient_matches_cpu() -> Result<()> {
    let cfg = config("vit");
    let build = |dev: &Device| -> Result<(VarMap, Mae)> {
        let vm = VarMap::new();
        let vb = SeededVarMap::var_builder(&vm, 3, DType::F32, dev);
        let mae = Mae::new(&cfg.model.vit, &cfg.model.mae, 28, 1, vb)?;
        Ok((vm, mae))
    };
    let ((vc, mae_c), (vg, mae_g)) = (build(&Device::Cpu)?, build(&gpu())?);
    let xc = randn(&[8, 1, 28, 28], 4, &Device::Cpu)?;
    let masking = mae_c.random_masking(8, &mut Rng::seed_from_u64(5));
    let lc = mae_c.loss_with(&xc, &masking)?;
    let lg = mae_g.loss_with(&xc.to_device(&gpu())?, &masking)?;
    let (e, name) = grad_err(&vc, &lc, &vg, &lg)?;
    println!(
        "mae: loss cpu {} gpu {}; worst gradient rel diff {e:.2e} ({name})",
        lc.to_scalar::<f32>()?,
        lg.to_scalar::<f32>()?
    );
    assert!(e < TOL, "MAE gradient of {name} differs by {e:e}");
    Ok(())
}

/// The optimiser alone: both sides get the CPU's gradients (a parameter whose gradient is zero in
/// exact arithmetic, like the attention key bias, has rounding-noise gradients that Adam normalises
/// to full-size steps of either sign, so gradients computed on each device cannot be compared
/// after an Adam step).
#[test]
fn adamw_steps_match_cpu() -> Result<()> {
    let cfg = config("vit");
    let (vc, mc, vg, mg) = pair(&cfg)?;
    let hp = AdamWParams::from_train(&cfg.train);
    let (mut oc, mut og) = (AdamW::new(&vc, hp.clone(), Some(4))?, AdamW::new(&vg, hp, Some(4))?);
    let labels: Vec<u32> = (0..16).map(|i| i % 10).collect();
    let yc = Tensor::new(labels.as_slice(), &Device::Cpu)?;
    for step in 0..3 {
        let xc = randn(&[16, 1, 28, 28], 10 + step, &Device::Cpu)?;
        let gc = candle_nn::loss::cross_entropy(&mc.forward(&xc)?, &yc)?.backward()?;
        let xg = xc.to_device(&gpu())?;
        let mut gg = candle_nn::loss::cross_entropy(&mg.forward(&xg)?, &yc.to_device(&gpu())?)?.backward()?;
        for (name, v) in vc.data().lock().unwrap().iter() {
            let g = gc
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            gg.insert(vg.data().lock().unwrap()[name].as_tensor(), g.to_device(&gpu())?);
        }
        oc.accumulate(&gc)?;
        oc.step(1e-3)?;
        og.accumulate(&gg)?;
        og.step(1e-3)?;
    }
    let (c, g) = (vc.data().lock().unwrap(), vg.data().lock().unwrap());
    let worst = c
        .iter()
        .map(|(n, v)| rel_err(g[n].as_tensor(), v.as_tensor()).map(|e| (e, n.clone())))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a });
    println!("adamw: 3 steps, worst parameter rel diff {:.2e} ({})", worst.0, worst.1);
    assert!(
        worst.0 < TOL,
        "after 3 AdamW steps {} differs by {:e}",
        worst.1,
        worst.0
    );
    Ok(())
}

#[test]
fn warps_match_cpu() -> Result<()> {
    let xc = randn(&[4, 3, 28, 28], 6, &Device::Cpu)?;
    let xg = xc.to_device(&gpu())?;
    let ts = [0.3, -1.2, 2.0, 0.05];
    for tr in [
        Transform::Rotate,
        Transform::ShearX,
        Transform::Hyperbolic,
        Transform::TranslateY,
    ] {
        for pad in [Padding::Zeros, Padding::Reflect] {
            let e = rel_err(&apply(&xg, tr, &ts, pad)?, &apply(&xc, tr, &ts, pad)?)?;
            assert!(e < 1e-5, "{tr} warp ({pad:?}) differs by {e:e}");
        }
    }
    let v = Var::from_tensor(&xg)?;
    let g = apply(v.as_tensor(), Transform::Rotate, &ts, Padding::Reflect)?
        .sqr()?
        .sum_all()?
        .backward()?;
    assert!(
        g.get(v.as_tensor()).is_some(),
        "the warp must be differentiable on the GPU"
    );
    Ok(())
}
